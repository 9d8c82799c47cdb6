"""Chunked cross-entropy equals the whole one, value and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxflash.loss import cross_entropy


def inputs():
  h = jax.random.normal(jax.random.key(0), (2, 24, 16), jnp.float32)
  wte = jax.random.normal(jax.random.key(1), (40, 16), jnp.float32)
  targets = jax.random.randint(jax.random.key(2), (2, 24), 0, 40)
  return h, wte, targets


@pytest.mark.parametrize('num_chunks', [2, 3, 24])
def test_chunks_match_whole(num_chunks):
  h, wte, targets = inputs()
  grad = jax.value_and_grad(cross_entropy, argnums=(0, 1))
  loss, (dh, dwte) = grad(h, wte, targets)
  chunked, (dh_c, dwte_c) = grad(h, wte, targets, num_chunks)
  np.testing.assert_allclose(chunked, loss, rtol=1e-6)
  np.testing.assert_allclose(dh_c, dh, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dwte_c, dwte, rtol=1e-5, atol=1e-7)


def test_chunks_of_a_sequence_sharded_over_devices():
  h, wte, targets = inputs()
  mesh = jax.make_mesh((4,), ('seq',))
  shard = lambda x: jax.device_put(
      x, jax.NamedSharding(mesh, P(None, 'seq')))
  chunked = jax.jit(cross_entropy, static_argnums=3)(
      shard(h), wte, shard(targets), 3)
  np.testing.assert_allclose(chunked, cross_entropy(h, wte, targets),
                             rtol=1e-6)


def test_bad_chunk_count_is_refused():
  h, wte, targets = inputs()
  with pytest.raises(ValueError, match='24 positions do not split into 5'):
    cross_entropy(h, wte, targets, 5)
