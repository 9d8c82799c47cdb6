"""GPT of the GPT-2/GPT-3 family in Flax NNX.

Pre-LayerNorm blocks, learned position embeddings, tanh-GELU MLP, tied input
and output embeddings. Parameters are float32; matmuls run in `dtype`; softmax
statistics and the loss are float32.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflash import ring
from jaxflash.attention import attention
from kernels import reference_attention
from kernels.flash_attention import RESIDUAL_NAMES

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 50264
  max_seq_len: int = 1024
  d_model: int = 768
  n_layer: int = 12
  n_head: int = 12
  mlp_ratio: int = 4
  scale_attn_by_inverse_layer_idx: bool = True
  dropout: float = 0.0
  attention_impl: str = 'xla'  # resolved: 'xla' or 'flash'
  flash_backend: str = 'auto'  # the flash kernels': triton, mosaic, auto
  dtype: str = 'bfloat16'
  remat: str = 'none'
  loss_chunks: int = 1
  seq_parallel: int = 1  # devices on the mesh axis 'seq' (ring attention)

  @property
  def head_dim(self):
    return self.d_model // self.n_head

  @classmethod
  def from_config(cls, config, attention_impl):
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.model.items() if k in fields}
    kwargs.update(attention_impl=attention_impl, seq_parallel=config.mesh.seq)
    return cls(**kwargs)


REMAT_POLICIES = {
    'full': None,
    'save_attention': jax.checkpoint_policies.save_only_these_names(
        *RESIDUAL_NAMES),
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The Linear layers run in cfg.dtype: the train step casts their parameters
# once per step (cast_for_compute) rather than once per microbatch.
MATMUL_LAYERS = ('qkv', 'attn_out', 'fc', 'fc_out')


def cast_for_compute(params, dtype):
  """The Linear layers' parameters in `dtype`; the rest as they are."""
  def cast(path, x):
    names = {getattr(k, 'key', None) for k in path}
    return x.astype(dtype) if names & set(MATMUL_LAYERS) else x
  return jax.tree.map_with_path(cast, params)


@jax.custom_vjp
def tied_logits(h_BxTxD, wte_VxD):
  """float32 logits of h @ wte.T computed in h's dtype.

  The backward runs in h's dtype too (as mixed precision does elsewhere);
  left to autodiff, the float32 cotangent would make both backward matmuls
  float32.
  """
  return jnp.einsum('btd,vd->btv', h_BxTxD, wte_VxD.astype(h_BxTxD.dtype),
                    preferred_element_type=jnp.float32)


def _tied_logits_fwd(h_BxTxD, wte_VxD):
  return tied_logits(h_BxTxD, wte_VxD), (h_BxTxD, wte_VxD)


def _tied_logits_bwd(residuals, g_BxTxV):
  h_BxTxD, wte_VxD = residuals
  g_BxTxV = g_BxTxV.astype(h_BxTxD.dtype)
  dh_BxTxD = jnp.einsum('btv,vd->btd', g_BxTxV, wte_VxD.astype(h_BxTxD.dtype))
  dwte_VxD = jnp.einsum('btv,btd->vd', g_BxTxV, h_BxTxD,
                        preferred_element_type=jnp.float32)
  return dh_BxTxD, dwte_VxD.astype(wte_VxD.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def _dropout(x, rate, key):
  if not rate or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
  """x + attn(ln(x)); x + mlp(ln(x))."""

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layer_idx = layer_idx
    d = cfg.d_model
    dtype = jnp.dtype(cfg.dtype)
    init = nnx.initializers.normal(INIT_STD)
    # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
    out_init = nnx.initializers.normal(INIT_STD / math.sqrt(2 * cfg.n_layer))
    linear = lambda i, o, k_init: nnx.Linear(
        i, o, dtype=dtype, kernel_init=k_init, rngs=rngs)
    self.ln_1 = nnx.LayerNorm(d, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
    self.qkv = linear(d, 3 * d, init)
    self.attn_out = linear(d, d, out_init)
    self.ln_2 = nnx.LayerNorm(d, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
    self.fc = linear(d, cfg.mlp_ratio * d, init)
    self.fc_out = linear(cfg.mlp_ratio * d, d, out_init)

  def __call__(self, x_BxTxD, dropout_key=None):
    cfg = self.cfg
    keys = ([None] * 2 if dropout_key is None
            else list(jax.random.split(dropout_key, 2)))
    q, k, v = self._qkv(x_BxTxD)
    y_BxTxHxK = attention(q, k, v, impl=cfg.attention_impl, causal=True,
                          sm_scale=self._sm_scale(),
                          seq_parallel=cfg.seq_parallel,
                          backend=cfg.flash_backend)
    return self._after_attention(x_BxTxD, y_BxTxHxK, keys)

  def prefill(self, x_BxTxD, cache_len):
    """__call__ without dropout, also returning this layer's KV cache: the
    keys and values of the T tokens, zero-padded to cache_len positions."""
    cfg = self.cfg
    q, k, v = self._qkv(x_BxTxD)
    y_BxTxHxK = attention(q, k, v, impl=cfg.attention_impl, causal=True,
                          sm_scale=self._sm_scale(),
                          backend=cfg.flash_backend)
    pad = ((0, 0), (0, cache_len - x_BxTxD.shape[1]), (0, 0), (0, 0))
    return (self._after_attention(x_BxTxD, y_BxTxHxK),
            (jnp.pad(k, pad), jnp.pad(v, pad)))

  def decode(self, x_Bx1xD, cache, position):
    """One token at `position` attending to the cache's positions before it
    and itself; returns its output and the cache with its keys and values."""
    q_Bx1xHxK, k_Bx1xHxK, v_Bx1xHxK = self._qkv(x_Bx1xD)
    k_BxLxHxK, v_BxLxHxK = (
        jax.lax.dynamic_update_slice_in_dim(c, new, position, axis=1)
        for c, new in zip(cache, (k_Bx1xHxK, v_Bx1xHxK)))
    # One query against the whole fixed-size cache: later (empty) positions
    # are masked out as another segment.
    b, cache_len = k_BxLxHxK.shape[:2]
    visible_BxL = jnp.broadcast_to(jnp.arange(cache_len) <= position,
                                   (b, cache_len)).astype(jnp.int32)
    y_Bx1xHxK = reference_attention(
        q_Bx1xHxK, k_BxLxHxK, v_BxLxHxK, sm_scale=self._sm_scale(),
        segment_ids=(jnp.ones((b, 1), jnp.int32), visible_BxL))
    return (self._after_attention(x_Bx1xD, y_Bx1xHxK),
            (k_BxLxHxK, v_BxLxHxK))

  def _sm_scale(self):
    sm_scale = self.cfg.head_dim ** -0.5
    if self.cfg.scale_attn_by_inverse_layer_idx:
      sm_scale /= self.layer_idx + 1
    return sm_scale

  def _qkv(self, x_BxTxD):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    h = self.ln_1(x_BxTxD).astype(cfg.dtype)
    qkv_BxTx3xHxK = self.qkv(h).reshape(b, t, 3, cfg.n_head, cfg.head_dim)
    return tuple(qkv_BxTx3xHxK[:, :, i] for i in range(3))

  def _after_attention(self, x_BxTxD, y_BxTxHxK, keys=(None, None)):
    """The residual adds around attention's output projection and the MLP."""
    cfg = self.cfg
    b, t, d = x_BxTxD.shape
    y_BxTxD = self.attn_out(y_BxTxHxK.reshape(b, t, d))
    x_BxTxD = x_BxTxD + _dropout(y_BxTxD, cfg.dropout, keys[0])
    h = self.ln_2(x_BxTxD).astype(cfg.dtype)
    h = jax.nn.gelu(self.fc(h), approximate=True)
    x_BxTxD = x_BxTxD + _dropout(self.fc_out(h), cfg.dropout, keys[1])
    return x_BxTxD


class GPT(nnx.Module):
  """Token ids [batch, seq] -> logits [batch, seq, vocab] in float32.

  With seq_parallel > 1 the sequence is in ring attention's zigzag order:
  pass the matching `positions_T` (ring.to_layout of arange).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(INIT_STD)
    self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                         rngs=rngs)
    self.wpe = nnx.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=init,
                         rngs=rngs)
    self.blocks = nnx.List(
        [Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=jnp.float32,
                              rngs=rngs)

  def __call__(self, tokens_BxT, positions_T=None, dropout_key=None):
    # Tied output embedding; logits in float32 for a stable softmax.
    return tied_logits(self.hidden(tokens_BxT, positions_T, dropout_key),
                       self.wte.embedding[...])

  def hidden(self, tokens_BxT, positions_T=None, dropout_key=None):
    """The final normalized states [batch, seq, d_model] in cfg.dtype."""
    cfg = self.cfg
    if positions_T is None:
      positions_T = jnp.arange(tokens_BxT.shape[1])
    # The residual stream stays float32; each block computes in cfg.dtype.
    x_BxTxD = self.wte(tokens_BxT) + self.wpe(positions_T)[None]
    if cfg.seq_parallel > 1:
      x_BxTxD = jax.lax.with_sharding_constraint(
          x_BxTxD, jax.sharding.PartitionSpec(
              ring.batch_axes(jax.sharding.get_abstract_mesh(), 'seq'), 'seq'))
    block_keys = ([None] * (cfg.n_layer + 1) if dropout_key is None
                  else list(jax.random.split(dropout_key, cfg.n_layer + 1)))
    x_BxTxD = _dropout(x_BxTxD, cfg.dropout, block_keys.pop())
    run_block = lambda block, x, key: block(x, key)
    if cfg.remat != 'none':
      run_block = nnx.remat(run_block, policy=REMAT_POLICIES[cfg.remat])
    for block, key in zip(self.blocks, block_keys):
      x_BxTxD = run_block(block, x_BxTxD, key)
    return self.ln_f(x_BxTxD).astype(cfg.dtype)

  def prefill(self, tokens_BxT, cache_len):
    """The next token's logits [batch, vocab] after a prompt, in one forward
    pass, and the KV cache (a (keys, values) pair a layer) of cache_len
    positions holding the prompt's."""
    t = tokens_BxT.shape[1]
    x_BxTxD = self.wte(tokens_BxT) + self.wpe(jnp.arange(t))[None]
    cache = []
    for block in self.blocks:
      x_BxTxD, layer_cache = block.prefill(x_BxTxD, cache_len)
      cache.append(layer_cache)
    return self._next_logits(x_BxTxD[:, -1]), cache

  def decode(self, tokens_B, cache, position):
    """The next token's logits after tokens_B at `position`, attending to the
    cache; returns them and the updated cache."""
    x_Bx1xD = (self.wte(tokens_B) + self.wpe(position))[:, None]
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_Bx1xD, layer_cache = block.decode(x_Bx1xD, layer_cache, position)
      new_cache.append(layer_cache)
    return self._next_logits(x_Bx1xD[:, 0]), new_cache

  def _next_logits(self, x_BxD):
    h_BxD = self.ln_f(x_BxD).astype(self.cfg.dtype)
    return tied_logits(h_BxD[:, None], self.wte.embedding[...])[:, 0]


def count_params(cfg: ModelConfig):
  """Parameter count without allocating (tied embeddings counted once)."""
  abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
