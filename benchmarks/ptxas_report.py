"""ptxas's report (spills, stack, its performance notes) of each Mosaic GPU
kernel compiled inside `capture()`.

With MOSAIC_GPU_DUMP_PTXAS set, Mosaic prints ptxas's verbose output to the
process's stdout from C++, out of Python's reach: capture() points file
descriptor 1 at a temporary file meanwhile. Register counts are left out:
ptxas reports the launch limit (65536 / threads), not what the consumer
warpgroups use after setmaxnreg.

  with ptxas_report.capture() as reports:
    jax.jit(f).lower(x).compile()
  reports  # [{'spill_stores': 116, 'spill_loads': 128, 'stack': 120,
           #   'notes': ['(C7519) warpgroup.arrive is injected ...']}, ...]

Run as a script, it prints those reports for the Mosaic kernels' sweep
variants (benchmarks/attention.py's names) compiled for an H100 without a
GPU: XLA's deviceless compile, through the CUDA plugin and the device
description in h100_sxm.txtpb. The counts match the GPU's (checked against
the 2026-12-07 sweeps). It needs the plugin, which requirements.txt leaves
out (134 MB, and tests would then look for a GPU):

  pip install jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
  python benchmarks/ptxas_report.py --shapes s8192_d128 --causal yes \
      --variants 'bwd q64 k128 s2 stagger,bwd q64 k64 s2 fused'
"""
import argparse
import contextlib
import os
import re
import sys
import tempfile

_FRAME = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, '
                    r'(\d+) bytes spill loads')
_NOTE = re.compile(r'ptxas (?:info|warning)\s*: (\(C\d+\).*)')


def parse(text):
  """One report per kernel: ptxas prints one stack-frame line per function."""
  reports, notes = [], []
  for line in text.splitlines():
    if note := _NOTE.search(line):
      notes.append(note.group(1).strip())
    elif frame := _FRAME.search(line):
      stack, stores, loads = map(int, frame.groups())
      reports.append(dict(spill_stores=stores, spill_loads=loads, stack=stack,
                          notes=notes))
      notes = []
  return reports


@contextlib.contextmanager
def capture():
  """Yields a list that holds, on exit, the report of every kernel compiled
  meanwhile (none for kernels compiled earlier: Mosaic caches them)."""
  reports = []
  sys.stdout.flush()
  saved_fd = os.dup(1)
  saved_env = os.environ.get('MOSAIC_GPU_DUMP_PTXAS')
  with tempfile.TemporaryFile(mode='w+') as f:
    os.dup2(f.fileno(), 1)
    os.environ['MOSAIC_GPU_DUMP_PTXAS'] = '1'
    try:
      yield reports
    finally:
      sys.stdout.flush()
      os.dup2(saved_fd, 1)
      os.close(saved_fd)
      if saved_env is None:
        del os.environ['MOSAIC_GPU_DUMP_PTXAS']
      else:
        os.environ['MOSAIC_GPU_DUMP_PTXAS'] = saved_env
      f.seek(0)
      reports.extend(parse(f.read()))


def compile_variants(shape, causal, device, names=None):
  """(variant, reports) of each Mosaic sweep variant of `shape` (those in
  `names`, if given), compiled (not run) for `device`."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import attention
  sharding = jax.sharding.SingleDeviceSharding(device)
  dims = (shape.batch, shape.seq, shape.heads, shape.head_dim)
  x = jax.ShapeDtypeStruct(dims, jnp.bfloat16, sharding=sharding)
  lse = jax.ShapeDtypeStruct((shape.batch, shape.heads, shape.seq),
                             jnp.float32, sharding=sharding)
  for part, tuning in attention.mosaic_variants(shape.head_dim):
    name = attention.describe_mosaic(part, tuning)
    if names is not None and name not in names:
      continue
    if not attention.applies(part, tuning, causal):
      continue
    fn, args = attention.variant_call(part, tuning, causal, x, x, x, x, lse,
                                      x)
    with capture() as reports:
      jax.jit(fn).lower(*args).compile()
    yield name, reports


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, os.path.dirname(here))
  parser = argparse.ArgumentParser(
      description='ptxas spills of the Mosaic kernels, compiled for an H100 '
      'without a GPU')
  parser.add_argument('--shapes', default='s8192_d128',
                      help='comma list, as benchmarks/attention.py takes')
  parser.add_argument('--causal', choices=('yes', 'no'), default='yes')
  parser.add_argument('--variants', help='comma list of sweep variant names; '
                      'default all')
  parser.add_argument('--target', default=os.path.join(here, 'h100_sxm.txtpb'),
                      help='GpuTargetConfigProto text of the GPU to compile '
                      'for')
  args = parser.parse_args()
  # Compiling needs no cuDNN or driver, which the plugin checks for at import.
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental import topologies
  import attention
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', topology='1x1x1',
        target_config=open(args.target).read())
  except Exception as e:  # pylint: disable=broad-except
    parser.error(f'no deviceless CUDA compile here ({type(e).__name__}: '
                 f'{str(e)[:200]}); pip install jax-cuda13-plugin=='
                 f'{jax.__version__} jax-cuda13-pjrt=={jax.__version__}')
  device = topology.devices[0]
  names = args.variants and args.variants.split(',')
  for shape_name in args.shapes.split(','):
    try:
      shape = attention.shape_named(shape_name)
    except ValueError as e:
      parser.error(str(e))
    if error := attention.unknown_variants(names, shape.head_dim):
      parser.error(error)
    for name, reports in compile_variants(shape, args.causal == 'yes',
                                          device, names):
      spills = ', '.join(f'{r["spill_stores"]}/{r["spill_loads"]}'
                         for r in reports) or 'compiled earlier'
      print(f'{shape_name} {"causal" if args.causal == "yes" else "":6s} '
            f'{name:50s} spill stores/loads (B): {spills}', flush=True)


if __name__ == '__main__':
  main()
