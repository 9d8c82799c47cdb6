"""Reference attention semantics in pure JAX, computed in float32.

This is the definition every kernel in this package is tested against, and the
'xla' attention implementation of the model.
Layout: q [batch, seq_q, heads, head_dim], k/v [batch, seq_kv, kv_heads, head_dim].
"""
import jax
import jax.numpy as jnp


def split_segment_ids(segment_ids, seq_q, seq_kv):
  """Returns (q_segment_ids, kv_segment_ids) from one array or a pair."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    return tuple(segment_ids)
  if seq_q != seq_kv:
    raise ValueError(
        'segment_ids: one [batch, seq] array needs seq_q == seq_kv '
        f'(got {seq_q} and {seq_kv}); pass (q_segment_ids, kv_segment_ids).')
  return segment_ids, segment_ids


def attention_mask(seq_q, seq_kv, *, causal, q_segment_ids=None,
                   kv_segment_ids=None):
  """Boolean mask [batch or 1, 1, seq_q, seq_kv]; True where attention is allowed.

  Causal is aligned to the end (as FlashAttention-2): query i sees key j when
  j <= i + seq_kv - seq_q.
  """
  mask = jnp.ones((1, 1, seq_q, seq_kv), dtype=bool)
  if causal:
    q_pos = jnp.arange(seq_q)[:, None] + (seq_kv - seq_q)
    mask = mask & (jnp.arange(seq_kv)[None, :] <= q_pos)[None, None]
  if q_segment_ids is not None:
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = mask & same[:, None]
  return mask


def reference_attention(q, k, v, *, causal=False, sm_scale=None,
                        segment_ids=None, return_lse=False):
  """Exact softmax attention in float32; output in q's dtype.

  Rows with no visible key (possible with causal and seq_q > seq_kv) give a zero
  output and lse = -inf, as the kernels do.
  """
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  group = heads // kv_heads
  q32 = q.astype(jnp.float32).reshape(batch, seq_q, kv_heads, group, head_dim)
  k32 = k.astype(jnp.float32)
  v32 = v.astype(jnp.float32)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', q32, k32) * sm_scale
  logits = logits.reshape(batch, heads, seq_q, seq_kv)
  q_seg, kv_seg = split_segment_ids(segment_ids, seq_q, seq_kv)
  mask = attention_mask(seq_q, seq_kv, causal=causal, q_segment_ids=q_seg,
                        kv_segment_ids=kv_seg)
  logits = jnp.where(mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [batch, heads, seq_q]
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  probs = jnp.where(mask, jnp.exp(logits - safe_lse[..., None]), 0.0)
  probs = probs.reshape(batch, kv_heads, group, seq_q, seq_kv)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', probs, v32)
  out = out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)
  if return_lse:
    return out, lse
  return out


def reference_attention_bwd(q, k, v, o, lse, do, *, causal=False, sm_scale=None,
                            segment_ids=None):
  """Gradients (dq, dk, dv) of one attention block from the softmax statistics.

  FlashAttention-2's backward in pure JAX: P = exp(S - lse) is recomputed from
  the given lse, and delta = rowsum(dO * O). When o and lse are those of a
  longer key sequence that k/v are one chunk of (ring attention), this is that
  chunk's share of the gradient. float32 math; outputs in the inputs' dtypes.
  """
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  group = heads // kv_heads
  f32 = lambda x: x.astype(jnp.float32)
  q32 = f32(q).reshape(batch, seq_q, kv_heads, group, head_dim)
  do32 = f32(do).reshape(batch, seq_q, kv_heads, group, head_dim)
  o32 = f32(o).reshape(batch, seq_q, kv_heads, group, head_dim)
  k32, v32 = f32(k), f32(v)
  q_seg, kv_seg = split_segment_ids(segment_ids, seq_q, seq_kv)
  mask = attention_mask(seq_q, seq_kv, causal=causal, q_segment_ids=q_seg,
                        kv_segment_ids=kv_seg)
  mask = mask.reshape(mask.shape[0], 1, 1, seq_q, seq_kv)
  lse = lse.reshape(batch, kv_heads, group, seq_q)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', q32, k32) * sm_scale
  finite_lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no-key rows: P = 0
  probs = jnp.where(mask, jnp.exp(logits - finite_lse[..., None]), 0.0)
  delta = jnp.einsum('bqhgd,bqhgd->bhgq', do32, o32)
  dv = jnp.einsum('bhgqk,bqhgd->bkhd', probs, do32)
  dprobs = jnp.einsum('bqhgd,bkhd->bhgqk', do32, v32)
  dlogits = probs * (dprobs - delta[..., None]) * sm_scale
  dq = jnp.einsum('bhgqk,bkhd->bqhgd', dlogits, k32)
  dk = jnp.einsum('bhgqk,bqhgd->bkhd', dlogits, q32)
  dq = dq.reshape(batch, seq_q, heads, head_dim)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
