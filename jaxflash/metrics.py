"""Training metrics: a readable line, metrics.jsonl, FLOPs and MFU."""
import json
import os

import jax

# Dense bf16 peak FLOP/s by device kind (vendor datasheets, no sparsity).
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def flops_per_token(model_cfg, num_params, seq_len):
  """6N for the matmuls plus attention's scores and weighted sum (PaLM)."""
  non_embedding = num_params - model_cfg.max_seq_len * model_cfg.d_model
  attention = 12 * model_cfg.n_layer * model_cfg.d_model * seq_len
  return 6 * non_embedding + attention


def peak_flops_per_device():
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


def peak_memory_gib():
  """Peak device memory in use so far on this process's first device."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return peak / 2**30 if peak else None


class MetricsWriter:
  """Prints a line and appends a JSON record per call, on process 0 only."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, record):
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(_format(record), flush=True)


def _format(record):
  parts = []
  for key, value in record.items():
    if value is None:
      continue
    if isinstance(value, float):
      value = f'{value:.4g}' if abs(value) < 1e4 else f'{value:,.0f}'
    parts.append(f'{key} {value}')
  return ' | '.join(parts)
