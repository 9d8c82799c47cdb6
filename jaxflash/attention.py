"""The model's one attention entry point, dispatching on `impl`."""
import jax

from jaxflash import ring
from kernels import flash_attention
from kernels import reference_attention
from kernels.flash_attention import DEFAULT_BACKEND

IMPLS = ('xla', 'flash')


def resolve_impl(impl):
  """'auto': the Pallas flash kernel on GPU, the XLA reference elsewhere."""
  if impl != 'auto':
    return impl
  return 'flash' if jax.default_backend() == 'gpu' else 'xla'


def attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, *, impl, causal=True,
              sm_scale=None, seq_parallel=1,
              backend=DEFAULT_BACKEND):
  """Softmax attention; [batch, seq, heads, head_dim] in and out.

  With seq_parallel > 1 the sequence is sharded over the mesh axis 'seq' of
  the current mesh (jax.set_mesh) in zigzag order, and ring attention runs
  `impl` on each block. backend: the flash kernels' (flash_attention's).
  """
  if seq_parallel > 1:
    return ring.ring_attention(
        q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, mesh=jax.sharding.get_abstract_mesh(),
        seq_axis='seq', causal=causal, sm_scale=sm_scale, layout='zigzag',
        impl=impl, backend=backend)
  if impl == 'xla':
    return reference_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, causal=causal,
                               sm_scale=sm_scale)
  if impl == 'flash':
    return flash_attention(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, causal=causal,
                           sm_scale=sm_scale, backend=backend,
                           interpret=jax.default_backend() != 'gpu')
  raise ValueError(f'attention impl {impl!r} is not one of {IMPLS}')
