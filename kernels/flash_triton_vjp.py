"""FlashAttention-2 backward: delta = rowsum(dO * O), then a dK/dV kernel
parallel over key blocks and a dQ kernel parallel over query blocks, both
recomputing P = exp(s - lse) from the given lse. No atomics.

Nothing here assumes lse came from the same K/V: ring attention passes the
global lse, o and dO of a query chunk against one K/V chunk.
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import flash_triton as ft


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs,
                 sm_scale, causal, block_q, block_k, head_dim, has_segments):
  """dK, dV of one key block, summed over the q heads of its kv head (GQA)."""
  if has_segments:
    q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
  else:
    dk_ref, dv_ref = refs
  seq_q, group, head_dim_pad = q_ref.shape
  seq_kv = k_ref.shape[0]
  causal_offset = seq_kv - seq_q if causal else None
  scale = sm_scale * ft.LOG2E

  k_start = pl.program_id(0) * block_k
  k = ft.load_tile(k_ref, k_start, block_k, head_dim)
  v = ft.load_tile(v_ref, k_start, block_k, head_dim)
  # Transposed scores [block_k, block_q]: dK and dV come out row-major.
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
  k_seg = (ft.load_vec(kv_seg_ref, k_start, block_k)[:, None]
           if has_segments else None)
  ranges = ft.q_block_ranges(k_start, block_k, block_q, seq_q,
                             causal_offset=causal_offset,
                             has_segments=has_segments)

  def head(g, carry):
    def body(masked, i, carry):
      dk, dv = carry
      q_start = i * block_q
      q = ft.load_tile(q_ref, q_start, block_q, head_dim, head=g)
      s_t = ft.dot_t(k, q)
      if masked:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
        q_seg = (ft.load_vec(q_seg_ref, q_start, block_q)[None, :]
                 if has_segments else None)
        mask = ft.visible(q_pos, k_pos, causal_offset=causal_offset,
                          q_seg=q_seg, k_seg=k_seg)
        s_t = jnp.where(mask, s_t, ft.NEG_INF)
      # lse2 = +inf past the end and for rows that saw no key: P = 0 there.
      lse2 = ft.load_vec(lse2_ref, q_start, block_q, head=g, other=jnp.inf)
      p_t = jnp.exp2(s_t * scale - lse2[None, :])
      do = ft.load_tile(do_ref, q_start, block_q, head_dim, head=g)
      dv = dv + ft.dot(p_t.astype(do.dtype), do)
      delta = ft.load_vec(delta_ref, q_start, block_q, head=g)
      ds_t = p_t * (ft.dot_t(v, do) - delta[None, :])
      dk = dk + ft.dot(ds_t.astype(q.dtype), q)
      return dk, dv
    return ft.run_blocks(ranges, body, carry)

  zeros = jnp.zeros((block_k, head_dim_pad), jnp.float32)
  if group == 1:
    dk, dv = head(jnp.int32(0), (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  ft.store_tile(dk_ref, k_start, dk * sm_scale, head_dim)
  ft.store_tile(dv_ref, k_start, dv, head_dim)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs,
               sm_scale, causal, block_q, block_k, head_dim, has_segments):
  if has_segments:
    q_seg_ref, kv_seg_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  seq_q, head_dim_pad = q_ref.shape
  seq_kv = k_ref.shape[0]
  causal_offset = seq_kv - seq_q if causal else None
  scale = sm_scale * ft.LOG2E

  q_start = ft.query_block_start(block_q, causal)
  q = ft.load_tile(q_ref, q_start, block_q, head_dim)
  do = ft.load_tile(do_ref, q_start, block_q, head_dim)
  lse2 = ft.load_vec(lse2_ref, q_start, block_q, other=jnp.inf)[:, None]
  delta = ft.load_vec(delta_ref, q_start, block_q)[:, None]
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  q_seg = (ft.load_vec(q_seg_ref, q_start, block_q)[:, None]
           if has_segments else None)

  def body(masked, j, dq):
    k_start = j * block_k
    k = ft.load_tile(k_ref, k_start, block_k, head_dim)
    s = ft.dot_t(q, k)
    if masked:
      # Keys past the end are masked too: P there is exp(-lse), maybe inf.
      k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      k_seg = (ft.load_vec(kv_seg_ref, k_start, block_k)[None, :]
               if has_segments else None)
      mask = ft.visible(q_pos, k_pos, causal_offset=causal_offset,
                        seq_kv=seq_kv, q_seg=q_seg, k_seg=k_seg)
      s = jnp.where(mask, s, ft.NEG_INF)
    p = jnp.exp2(s * scale - lse2)
    v = ft.load_tile(v_ref, k_start, block_k, head_dim)
    ds = p * (ft.dot_t(do, v) - delta)
    return dq + ft.dot(ds.astype(k.dtype), k)

  ranges = ft.kv_block_ranges(q_start, block_q, block_k, seq_kv,
                              causal_offset=causal_offset,
                              has_segments=has_segments)
  dq = ft.run_blocks(ranges, body,
                     jnp.zeros((block_q, head_dim_pad), jnp.float32))
  ft.store_tile(dq_ref, q_start, dq * sm_scale, head_dim)


def flash_bwd(q, k, v, o, lse, do, dlse, q_seg, kv_seg, *, sm_scale, causal,
              block_sizes, interpret):
  """(dq, dk, dv) from the forward's o and lse (or global ones, for ring
  attention); dlse, if not None, is the cotangent of lse."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  head_dim_pad = ft.padded_head_dim(head_dim)
  has_segments = q_seg is not None
  # dS = P * (dP - delta) + dlse * P: the lse cotangent folds into delta.
  delta = jnp.einsum('bqhd,bqhd->bhq', o.astype(jnp.float32),
                     do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * ft.LOG2E)
  seg_args = [q_seg, kv_seg] if has_segments else []
  seg_specs = ft.segment_specs(seq_q, seq_kv) if has_segments else []
  kwargs = dict(sm_scale=sm_scale, causal=causal, head_dim=head_dim,
                has_segments=has_segments)

  block_q = ft.fit_block(block_sizes.block_q_dkv, seq_q)
  block_k = ft.fit_block(block_sizes.block_k_dkv, seq_kv)
  kv_spec = ft.bshd_spec(seq_kv, head_dim_pad)
  q_group_spec = ft.bshd_spec(seq_q, head_dim_pad, group=group)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=block_q, block_k=block_k,
                        **kwargs),
      grid=(ft.cdiv(seq_kv, block_k), batch, kv_heads),
      in_specs=[q_group_spec, kv_spec, kv_spec, q_group_spec,
                ft.bhs_spec(seq_q, group), ft.bhs_spec(seq_q, group),
                *seg_specs],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps_dkv,
          num_stages=block_sizes.num_stages_dkv),
      interpret=interpret,
      name='flash_bwd_dkdv',
  )(q, k, v, do, lse2, delta, *seg_args)

  block_q = ft.fit_block(block_sizes.block_q_dq, seq_q)
  block_k = ft.fit_block(block_sizes.block_k_dq, seq_kv)
  q_spec = ft.bshd_spec(seq_q, head_dim_pad)
  kv_spec = ft.bshd_spec(seq_kv, head_dim_pad, heads_per_index=group)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=block_q, block_k=block_k,
                        **kwargs),
      grid=(ft.cdiv(seq_q, block_q), batch, heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, ft.bhs_spec(seq_q),
                ft.bhs_spec(seq_q), *seg_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps_dq,
          num_stages=block_sizes.num_stages_dq),
      interpret=interpret,
      name='flash_bwd_dq',
  )(q, k, v, do, lse2, delta, *seg_args)
  return dq, dk, dv
