"""The model's one attention entry point, dispatching on `impl`."""
import jax

from kernels import reference_attention

IMPLS = ('xla', 'flash')


def resolve_impl(impl):
  """'auto' is the Pallas flash kernel on GPU and the XLA reference elsewhere."""
  if impl != 'auto':
    return impl
  return 'flash' if jax.default_backend() == 'gpu' else 'xla'


def attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, *, impl, causal=True,
              sm_scale=None):
  """Softmax attention; [batch, seq, heads, head_dim] in and out."""
  if impl == 'xla':
    return reference_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, causal=causal,
                               sm_scale=sm_scale)
  if impl == 'flash':
    from kernels import flash_attention  # pylint: disable=g-import-not-at-top
    return flash_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, causal=causal,
                           sm_scale=sm_scale,
                           interpret=jax.default_backend() != 'gpu')
  raise ValueError(f'attention impl {impl!r} is not one of {IMPLS}')
