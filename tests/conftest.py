"""Skips tests marked `gpu` where JAX sees no GPU."""
import jax
import pytest


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() == 'gpu':
    return
  skip = pytest.mark.skip(reason='needs a GPU')
  for item in items:
    if 'gpu' in item.keywords:
      item.add_marker(skip)
