"""Eight CPU devices for mesh tests; skips tests marked `gpu` without a GPU."""
import os

# Mosaic GPU interpret mode runs each warpgroup as a thread whose XLA
# computation blocks in callbacks while it waits on a barrier, so the CPU
# client's thread pool (NPROC threads, else one a core) needs one for each
# of a CTA's warpgroups: with three consumers' four, a 2-core machine
# deadlocked.
os.environ.setdefault('NPROC', '8')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import pytest

# Before any backend starts: ring attention tests need several devices.
jax.config.update('jax_num_cpu_devices', 8)


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() == 'gpu':
    return
  skip = pytest.mark.skip(reason='needs a GPU')
  for item in items:
    if 'gpu' in item.keywords:
      item.add_marker(skip)
