"""Training throughput of a GPT config on the local GPUs.

Times jaxflash's own train step (forward, backward, AdamW update) on random
tokens, after warm-up, for each variant given: tokens/s per GPU, MFU (6N plus
attention FLOPs over the dense bf16 peak in jaxflash/metrics.py), peak memory
per GPU and step time, printed beside the seed's H100 row.

  python benchmarks/train_throughput.py --config configs/owt/gpt3_2.7b.py \
      --per_device_batch 4 --variants remat=none,remat=dots

  # the same with one process per GPU, joined by jax.distributed:
  python benchmarks/train_throughput.py ... --processes 4

A variant is `key=value[;key=value]` over the config (model.* keys may drop
the `model.` prefix), e.g. `remat=full;attention_impl=xla`.
Writes <out>/train_throughput_<gpu>[_x<gpus>[_<n>proc]].json (default
runs/benchmarks/).
"""
import argparse
import datetime
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
import jaxflash  # XLA flags before JAX starts
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxflash import config as config_lib
from jaxflash import distributed
from jaxflash import metrics as metrics_lib
from jaxflash import optimizer as optimizer_lib
from jaxflash import sharding
from jaxflash import trainer
from jaxflash.model import GPT
from jaxflash.model import count_params
import trace_summary
import result_files
# pylint: enable=g-import-not-at-top

# The seed (FlashAttention-2, PyTorch, fp16 AMP), GPT-3 2.7B, seq 1024.
SEED_ROWS = [dict(gpus=1, tokens_per_sec=22_282, peak_gb=73),
             dict(gpus=8, tokens_per_sec=174_981, peak_gb=56)]
TOKENS_300B = 300e9


def load_config(path):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_variant(config, variant):
  for item in filter(None, variant.split(';')):
    key, value = item.split('=', 1)
    parent = config if '.' in key or key in config else config.model
    *path, leaf = key.split('.')
    for part in path:
      parent = parent[part]
    parent[leaf] = type(parent[leaf])(value) if not isinstance(
        parent[leaf], bool) else value == 'true'


def setup(config):
  """(mesh, state, jitted train step, random batch) for config on all
  devices; call under jax.set_mesh(mesh)."""
  num_devices = jax.device_count()
  config_lib.validate(config, num_devices)
  mesh = sharding.make_mesh(config.mesh, num_devices)
  cfg = trainer.model_config(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, config.steps)
  accum = config_lib.accumulation_steps(config, num_devices)
  with jax.set_mesh(mesh):
    replicated = NamedSharding(mesh, P())

    def build():
      model = GPT(cfg, rngs=nnx.Rngs(0))
      return trainer.init_state(config, nnx.split(model, nnx.Param), tx)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg,
                                                       rngs=nnx.Rngs(0))))
    state_sharding = sharding.state_shardings(mesh, jax.eval_shape(build),
                                              tx)
    state = jax.jit(build, out_shardings=state_sharding)()
    step = jax.jit(trainer.make_train_step(graphdef, tx, accum, cfg),
                   in_shardings=(state_sharding,
                                 sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, replicated),
                   donate_argnums=0)
    batch = jax.jit(lambda: jax.random.randint(
        jax.random.key(1), (config.batch_size, config.data.seq_len + 1), 0,
        50257), out_shardings=sharding.batch_sharding(mesh))()
  return mesh, state, step, batch


def measure(config, steps, warmup, profile_dir=None):
  num_devices = jax.device_count()
  cfg = trainer.model_config(config)
  accum = config_lib.accumulation_steps(config, num_devices)
  mesh, state, step, batch = setup(config)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    for _ in range(warmup):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    kernels = None
    if profile_dir:
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
      kernels = trace_summary.summarize(profile_dir, top=25)
  step_time = statistics.median(times)
  tokens = config.batch_size * config.data.seq_len
  num_params = count_params(cfg)
  flops = tokens * metrics_lib.flops_per_token(cfg, num_params,
                                               config.data.seq_len)
  peak = metrics_lib.peak_flops_per_device()
  tokens_per_sec_per_gpu = tokens / step_time / num_devices
  return dict(
      gpus=num_devices, processes=jax.process_count(), params=num_params, batch_size=config.batch_size,
      accumulation=accum, seq_len=config.data.seq_len, step_time=step_time,
      tokens_per_sec=tokens / step_time,
      tokens_per_sec_per_gpu=tokens_per_sec_per_gpu,
      mfu=flops / step_time / (peak * num_devices) if peak else None,
      # The process's peak so far: run one variant a process for exact peaks.
      peak_mem_gib=metrics_lib.peak_memory_gib(),
      days_to_300b=TOKENS_300B / (tokens / step_time) / 86400,
      loss=float(metrics['loss']), warmup_and_compile_s=compile_s,
      top_kernels=kernels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/owt/gpt3_2.7b.py')
  parser.add_argument('--per_device_batch', type=int, default=4)
  parser.add_argument('--accumulation', type=int, default=1,
                      help='microbatches of per_device_batch a step')
  parser.add_argument('--variants', default='remat=none',
                      help='comma list of key=value[;key=value] overrides')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--profile', default=None, metavar='DIR',
                      help='trace one more step a variant into DIR/<n> and '
                      'record its top kernels')
  parser.add_argument('--processes', type=int, default=1,
                      help='one process per GPU of this host, joined by '
                      'jax.distributed (each sees its own GPU)')
  parser.add_argument('--process_id', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--coordinator_address', help=argparse.SUPPRESS)
  result_files.add_out_flag(parser)
  args = parser.parse_args()
  if args.processes > 1:
    if args.process_id is None:
      sys.exit(spawn(args.processes))
    distributed.initialize(args.coordinator_address, args.processes,
                           args.process_id, local_device_ids=[args.process_id])
  n = jax.device_count()
  printing = jax.process_index() == 0
  records = []
  for i, variant in enumerate(args.variants.split(',')):
    config = load_config(args.config)
    config.data.dataset = 'sample'  # random tokens; no dataset is read
    config.micro_batch_size = args.per_device_batch
    config.batch_size = args.per_device_batch * n * args.accumulation
    apply_variant(config, variant)
    try:
      record = measure(config, args.steps, args.warmup, args.profile and
                       os.path.join(args.profile, str(i)))
    except Exception as e:  # pylint: disable=broad-except
      record = dict(error=f'{type(e).__name__}: {str(e)[:300]}')
    record.update(variant=variant, config=args.config)
    records.append(record)
    if not printing:
      continue
    print(json.dumps({k: v for k, v in record.items()
                      if k != 'top_kernels'}), flush=True)
    for name, ms, share, n in record.get('top_kernels') or []:
      print(f'  {ms:9.2f} ms {share:6.1%} {n:5d}  {name[:90]}')
    jax.clear_caches()
  if not printing:
    return
  result = dict(device=jax.devices()[0].device_kind, num_gpus=n,
                date=datetime.datetime.now().isoformat(), jax=jax.__version__,
                peak_flops_per_gpu=metrics_lib.peak_flops_per_device(),
                xla_flags=os.environ.get('XLA_FLAGS', ''), records=records)
  kind = jax.devices()[0].device_kind.replace(' ', '_')
  suffix = f'_x{n}' if n > 1 else ''
  suffix += f'_{args.processes}proc' if args.processes > 1 else ''
  path = result_files.new_path(args.out, f'train_throughput_{kind}{suffix}')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {path}')
  print(f'{"variant":<28} {"GPUs":>4} {"procs":>5} {"tokens/s/GPU":>13} '
        f'{"MFU":>6} '
        f'{"peak GiB":>9} {"step s":>7} {"days 300B":>10}')
  for r in records:
    if 'error' in r:
      print(f'{r["variant"]:<28} {r["error"][:80]}')
      continue
    mfu = f'{r["mfu"]:.1%}' if r['mfu'] else '-'
    mem = f'{r["peak_mem_gib"]:.1f}' if r['peak_mem_gib'] else '-'
    print(f'{r["variant"]:<28} {r["gpus"]:>4} {r["processes"]:>5} '
          f'{r["tokens_per_sec_per_gpu"]:>13,.0f}'
          f' {mfu:>6} {mem:>9} {r["step_time"]:>7.3f}'
          f' {r["days_to_300b"] * r["gpus"] / 8:>10.1f}')
  for row in SEED_ROWS:
    print(f'{"seed (FA2, PyTorch)":<28} {row["gpus"]:>4} {"":>5} '
          f'{row["tokens_per_sec"] / row["gpus"]:>13,.0f} {"":>6} '
          f'{row["peak_gb"]:>9} {"":>7} '
          f'{TOKENS_300B / (row["tokens_per_sec"] / row["gpus"] * 8) / 86400:>10.1f}')
  print('days 300B: 300B tokens at the per-GPU rate on 8 GPUs')


def spawn(num_processes):
  """Runs this command once a GPU, as processes 0..n-1 of one job;
  process 0 prints. Returns the worst exit status."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  children = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
       f'--process_id={i}', f'--coordinator_address=localhost:{port}'],
      stdout=None if i == 0 else subprocess.DEVNULL)
              for i in range(num_processes)]
  return max(abs(c.wait()) for c in children)


if __name__ == '__main__':
  main()
