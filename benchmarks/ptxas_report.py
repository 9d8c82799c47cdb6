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
"""
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
