"""Training metrics: a readable line, metrics.jsonl, TensorBoard events,
FLOPs and MFU."""
import json
import logging
import os

import jax
import tensorboardX

from jaxflash import progress

# tensorboardX warns of every NaN it writes; the training loop reports
# non-finite steps itself, in one line.
logging.getLogger('tensorboardX.x2num').setLevel(logging.ERROR)

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
  """Prints a line, appends a JSON record to metrics.jsonl and writes its
  numbers as TensorBoard scalars in workdir, per call, on process 0 only."""

  def __init__(self, workdir, start_step=0):
    """A run resuming at start_step first drops what was logged after it."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._drop_records_after(start_step)
    # tensorboardX writes the event files without TensorFlow; purge_step
    # hides the events of steps logged after the checkpoint, as above.
    self._events = tensorboardX.SummaryWriter(
        workdir, purge_step=start_step + 1 if start_step else None
    ) if self.enabled else None

  def write(self, record):
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key != 'step' and value is not None:
        self._events.add_scalar(key, value, record['step'])
    self._events.flush()  # TensorBoard shows a running job as it goes
    progress.write(_format(record))

  def close(self):
    if self.enabled:
      self._events.close()

  def _drop_records_after(self, step):
    """Keeps metrics.jsonl's records up to `step`, where the run resumes.

    A killed run may have logged steps past its last checkpoint, which the
    resumed run logs again; a line the kill cut short goes too.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line.rstrip('\n') + '\n')
      except json.JSONDecodeError:
        pass
    if kept != lines:
      temporary = self.path + '.tmp'
      with open(temporary, 'w') as f:
        f.writelines(kept)
      os.replace(temporary, self.path)  # a kill now leaves either file whole


def read(workdir):
  """The records of workdir's metrics.jsonl by step; where a resumed run
  logged a step again, its record."""
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    records = {r['step']: r for r in map(json.loads, f)}
  return [records[step] for step in sorted(records)]


def _format(record):
  parts = []
  for key, value in record.items():
    if value is None:
      continue
    if isinstance(value, float):
      value = f'{value:.4g}' if abs(value) < 1e4 else f'{value:,.0f}'
    parts.append(f'{key} {value}')
  return ' | '.join(parts)
