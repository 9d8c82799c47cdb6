"""Eight CPU devices for mesh tests; skips tests marked `gpu` without a GPU."""
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
