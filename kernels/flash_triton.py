"""FlashAttention-2 forward kernel (Pallas, Triton lowering) and the tile
helpers that the backward kernels in flash_triton_vjp.py share.

Each program sees one (batch, head) slice of an input over its whole sequence,
a [seq, head_dim_pad] ref (the dK/dV kernel: [seq, group, head_dim_pad], the q
heads of one kv head), and reads tiles with pl.ds. Tiles that run past the
sequence or head_dim are masked on load (zeros) and store, so no length needs to
divide a block and head dims such as 80 ride in a power-of-two tile.
Scores live in the log2 domain: s2 = q.k * sm_scale * log2(e), so one FMA and
one exp2 per score.
"""
import dataclasses
import functools
import math
import warnings

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# jax 0.11 deprecates the Pallas Triton lowering and warns on every lowering.
warnings.filterwarnings(
    'ignore', message='The Pallas Triton backend is deprecated',
    category=DeprecationWarning)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_INF = float('-inf')
MIN_BLOCK = 16  # Triton's smallest dot dimension.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters of the three kernels.

  fwd: block_q rows per program, block_k keys per loop step. dK/dV: block_k_dkv
  keys per program, block_q_dkv queries per step. dQ: block_q_dq queries per
  program, block_k_dq keys per step. Sizes are powers of two >= 16; each is
  shrunk to the (power-of-two rounded) sequence when that is shorter.
  """
  block_q: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  block_q_dkv: int = 64
  block_k_dkv: int = 128
  num_warps_dkv: int = 8
  num_stages_dkv: int = 2
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps_dq: int = 8
  num_stages_dq: int = 3

  @classmethod
  def default(cls, head_dim, seq_kv, causal):
    """Defaults from H100 sweeps (kernels/NOTES.md)."""
    if head_dim <= 64:
      return cls(block_q=128, block_k=64, num_warps=4, num_stages=3,
                 block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4,
                 num_stages_dkv=3, block_q_dq=64, block_k_dq=64,
                 num_warps_dq=4, num_stages_dq=3)
    if head_dim <= 128:
      if causal and seq_kv <= 1024:  # more, smaller programs balance better
        return cls(block_q=64, block_k=64, num_warps=4, num_stages=3)
      return cls()
    return cls(block_q=64, block_k=32, num_warps=4, num_stages=2,
               block_q_dkv=32, block_k_dkv=64, num_warps_dkv=8,
               num_stages_dkv=1, block_q_dq=64, block_k_dq=32,
               num_warps_dq=8, num_stages_dq=1)


def padded_head_dim(head_dim):
  return max(MIN_BLOCK, pl.next_power_of_2(head_dim))


def fit_block(block, seq):
  """The block, shrunk to the sequence's power-of-two size when that is less."""
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(seq)))


def cdiv(a, b):
  """Ceil division of a non-negative static or traced index."""
  return -(-a // b) if isinstance(a, int) else lax.div(a + b - 1, b)


def _div(a, b):
  return a // b if isinstance(a, int) else lax.div(a, b)


def _min(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else (
      jnp.minimum(a, b))


def _max(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else (
      jnp.maximum(a, b))


# --- Tiles -------------------------------------------------------------------


def _tile_index(start, size, head):
  return (pl.ds(start, size),) + (() if head is None else (head,))


def _tile_mask(start, size, seq_len, head_dim, head_dim_pad):
  """Rows inside seq_len x columns inside head_dim; None when all are."""
  mask = None
  if seq_len % size:  # starts are multiples of size, so only tails overrun
    mask = (start + lax.broadcasted_iota(jnp.int32, (size, 1), 0)) < seq_len
  if head_dim != head_dim_pad:
    cols = lax.broadcasted_iota(jnp.int32, (1, head_dim_pad), 1) < head_dim
    mask = cols if mask is None else mask & cols
  return mask


def load_tile(ref, start, size, head_dim, head=None):
  """[size, head_dim_pad] rows of a [seq, (group,) head_dim_pad] ref, with
  zeros outside the array."""
  idx = _tile_index(start, size, head) + (slice(None),)
  mask = _tile_mask(start, size, ref.shape[0], head_dim, ref.shape[-1])
  if mask is None:
    return ref[idx]
  return plgpu.load(ref.at[idx], mask=mask, other=0.0)


def store_tile(ref, start, value, head_dim):
  size = value.shape[0]
  idx = _tile_index(start, size, None) + (slice(None),)
  mask = _tile_mask(start, size, ref.shape[0], head_dim, ref.shape[-1])
  plgpu.store(ref.at[idx], value.astype(ref.dtype), mask=mask)


def _vec_mask(start, size, seq_len):
  if seq_len % size == 0:
    return None
  return start + lax.broadcasted_iota(jnp.int32, (size,), 0) < seq_len


def load_vec(ref, start, size, head=None, other=0):
  """[size] entries of a [seq] (or [group, seq]) ref; `other` past the end."""
  idx = (() if head is None else (head,)) + (pl.ds(start, size),)
  mask = _vec_mask(start, size, ref.shape[-1])
  if mask is None:
    return ref[idx]
  return plgpu.load(ref.at[idx], mask=mask, other=other)


def store_vec(ref, start, value):
  size = value.shape[0]
  plgpu.store(ref.at[pl.ds(start, size)], value,
              mask=_vec_mask(start, size, ref.shape[-1]))


def dot(a, b):
  """a @ b with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def dot_t(a, b):
  """a @ b.T with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)


# --- Masks and block ranges --------------------------------------------------


def visible(q_pos, k_pos, *, causal_offset, seq_kv=None, q_seg=None,
            k_seg=None):
  """True where query q_pos may see key k_pos (shapes broadcast: [bq,1]x[1,bk]
  or the transpose). causal_offset = seq_kv - seq_q, or None if not causal;
  seq_kv masks keys past the end (None where those contribute nothing anyway).
  """
  mask = None
  def conj(m):
    return m if mask is None else mask & m
  if causal_offset is not None:
    mask = conj(k_pos <= q_pos + causal_offset)
  if seq_kv is not None:
    mask = conj(k_pos < seq_kv)
  if q_seg is not None:
    mask = conj(q_seg == k_seg)
  return mask


def kv_block_ranges(q_start, block_q, block_k, seq_kv, *, causal_offset,
                    has_segments):
  """[(lo, hi, masked)] key blocks for the query block at q_start.

  Keys past the causal diagonal are skipped by the loop bound; blocks that every
  query row sees in full run without a mask; the diagonal and the sequence tail
  run masked.
  """
  num_k = cdiv(seq_kv, block_k)
  hi, full = num_k, seq_kv // block_k
  if causal_offset is not None:
    last_q = q_start + block_q + causal_offset  # keys < last_q are visible
    hi = _min(cdiv(_max(last_q, 0), block_k), num_k)
    full = _min(_div(_max(q_start + causal_offset + 1, 0), block_k), full)
  full = _min(full, hi)
  if has_segments:
    return [(0, hi, True)]
  return [(0, full, False), (full, hi, True)]


def q_block_ranges(k_start, block_k, block_q, seq_q, *, causal_offset,
                   has_segments):
  """[(lo, hi, masked)] query blocks for the key block at k_start (dK/dV).

  Query blocks above the causal diagonal are skipped by the loop bound. The
  query tail needs no mask: its rows load q = dO = 0 and lse = +inf, so P = 0.
  """
  num_q = cdiv(seq_q, block_q)
  lo, first_full = 0, 0
  if causal_offset is not None:
    lo = _min(_div(_max(k_start - causal_offset, 0), block_q), num_q)
    last_k = k_start + block_k - 1 - causal_offset
    first_full = _max(_min(cdiv(_max(last_k, 0), block_q), num_q), lo)
  if has_segments:
    return [(lo, num_q, True)]
  return [(lo, first_full, True), (first_full, num_q, False)]


def run_blocks(ranges, body, carry):
  """Runs body(masked, i, carry) over each range but statically empty ones."""
  for lo, hi, masked in ranges:
    if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
      continue
    carry = lax.fori_loop(lo, hi, functools.partial(body, masked), carry)
  return carry


def query_block_start(block_q, causal):
  """Start row of this program's query block; causal runs the longest first."""
  i = pl.program_id(0)
  if causal:
    i = pl.num_programs(0) - 1 - i
  return i * block_q


# --- Specs -------------------------------------------------------------------


def bshd_spec(seq, head_dim_pad, group=None, heads_per_index=1):
  """Whole-sequence block of a [batch, seq, heads, head_dim] array for grid
  (i, b, h): head h // heads_per_index, or with `group`, heads
  [h * group, (h + 1) * group) as a middle block axis."""
  return pl.BlockSpec((None, seq, group, head_dim_pad),
                      lambda i, b, h: (b, 0, h // heads_per_index, 0))


def bhs_spec(seq, group=None):
  """Whole-sequence block of a [batch, heads, seq] array (lse, delta)."""
  return pl.BlockSpec((None, group, seq), lambda i, b, h: (b, h, 0))


def segment_specs(seq_q, seq_kv):
  return [pl.BlockSpec((None, seq_q), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, seq_kv), lambda i, b, h: (b, 0))]


# --- Forward -----------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, sm_scale, causal, block_q,
                block_k, head_dim, has_segments):
  if has_segments:
    q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  seq_q, seq_kv, head_dim_pad = q_ref.shape[0], k_ref.shape[0], q_ref.shape[-1]
  causal_offset = seq_kv - seq_q if causal else None
  scale = sm_scale * LOG2E

  q_start = query_block_start(block_q, causal)
  q = load_tile(q_ref, q_start, block_q, head_dim)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  q_seg = (load_vec(q_seg_ref, q_start, block_q)[:, None]
           if has_segments else None)

  def body(masked, j, carry):
    acc, m, l = carry
    k_start = j * block_k
    k = load_tile(k_ref, k_start, block_k, head_dim)
    s = dot_t(q, k)  # [block_q, block_k], natural units / sm_scale
    if masked:
      k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      k_seg = (load_vec(kv_seg_ref, k_start, block_k)[None, :]
               if has_segments else None)
      mask = visible(q_pos, k_pos, causal_offset=causal_offset, seq_kv=seq_kv,
                     q_seg=q_seg, k_seg=k_seg)
      s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
    # A row with nothing visible yet keeps m = -inf; exponents must not be NaN.
    m_use = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
    p = jnp.exp2(s * scale - m_use[:, None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + jnp.sum(p, axis=1)
    v = load_tile(v_ref, k_start, block_k, head_dim)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros((block_q, head_dim_pad), jnp.float32),
           jnp.full((block_q,), NEG_INF, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  ranges = kv_block_ranges(q_start, block_q, block_k, seq_kv,
                           causal_offset=causal_offset,
                           has_segments=has_segments)
  acc, m, l = run_blocks(ranges, body, carry)
  # Rows that saw no key (l == 0) give o = 0 and lse = -inf.
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  store_tile(o_ref, q_start, acc / l_safe[:, None], head_dim)
  store_vec(lse_ref, q_start,
            jnp.where(empty, NEG_INF, (m + jnp.log2(l_safe)) * LN2))


def flash_fwd(q, k, v, q_seg, kv_seg, *, sm_scale, causal, block_sizes,
              interpret):
  """(o [b, s_q, h, d], lse float32 [b, h, s_q]); inputs already validated."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  head_dim_pad = padded_head_dim(head_dim)
  block_q = fit_block(block_sizes.block_q, seq_q)
  block_k = fit_block(block_sizes.block_k, seq_kv)
  has_segments = q_seg is not None
  group = heads // kv_heads
  kernel = functools.partial(
      _fwd_kernel, sm_scale=sm_scale, causal=causal, block_q=block_q,
      block_k=block_k, head_dim=head_dim, has_segments=has_segments)
  in_specs = [bshd_spec(seq_q, head_dim_pad),
              bshd_spec(seq_kv, head_dim_pad, heads_per_index=group),
              bshd_spec(seq_kv, head_dim_pad, heads_per_index=group)]
  args = [q, k, v]
  if has_segments:
    in_specs += segment_specs(seq_q, seq_kv)
    args += [q_seg, kv_seg]
  return pl.pallas_call(
      kernel,
      grid=(cdiv(seq_q, block_q), batch, heads),
      in_specs=in_specs,
      out_specs=[bshd_spec(seq_q, head_dim_pad), bhs_spec(seq_q)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name='flash_fwd',
  )(*args)
