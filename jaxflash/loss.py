"""Next-token cross-entropy from the final hidden states, a chunk at a time."""
import jax
import jax.numpy as jnp
import optax

from jaxflash.model import tied_logits


def cross_entropy(h_BxTxD, wte_VxD, targets_BxT, num_chunks=1):
  """Mean cross-entropy of the tied logits h @ wte.T against targets.

  Whole, the float32 logits [B, T, V] would dominate memory at long context
  (50,264 floats a token, and as many again for their gradient). With
  num_chunks > 1 only T / num_chunks positions have logits at a time, in the
  backward too (each chunk is recomputed). Chunk c holds positions c,
  c + num_chunks, ...: strided, so that a sequence sharded over devices in
  contiguous pieces (ring attention) is chunked on every device alike.
  """
  if num_chunks == 1:
    return optax.softmax_cross_entropy_with_integer_labels(
        tied_logits(h_BxTxD, wte_VxD), targets_BxT).mean()
  b, t, d = h_BxTxD.shape
  if t % num_chunks:
    raise ValueError(f'{t} positions do not split into {num_chunks} chunks')
  h_CxBxAxD = h_BxTxD.reshape(b, t // num_chunks, num_chunks, d).transpose(
      2, 0, 1, 3)
  targets_CxBxA = targets_BxT.reshape(b, t // num_chunks,
                                      num_chunks).transpose(2, 0, 1)

  @jax.checkpoint
  def add_chunk(total, chunk):
    h_BxAxD, targets_BxA = chunk
    return total + optax.softmax_cross_entropy_with_integer_labels(
        tied_logits(h_BxAxD, wte_VxD), targets_BxA).sum(), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32),
                          (h_CxBxAxD, targets_CxBxA))
  return total / (b * t)
