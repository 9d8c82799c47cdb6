"""FlashAttention forward for Hopper (sm_90) in Pallas Mosaic GPU, and the
pieces that the backward in flash_mosaic_vjp.py shares.

One CTA per tile of (128 query rows, head, batch row), or, persistent
(MosaicConfig.persistent), one per SM running several tiles; three
warpgroups (four with MosaicConfig.consumers=3, 192-row tiles):
  - warpgroups 0 and 1 (consumers) each own 64 query rows (wgmma's M), run
    S = Q K^T and O += P V on the tensor cores with wgmma and the online
    softmax in registers;
  - the last warpgroup (producer) streams K and V tiles with TMA into a ring
    of `num_stages` shared-memory slots and gives most of its registers to
    the consumers (set_max_registers).
Slots are handed over with mbarriers: k_ready/v_ready (TMA completion) and
k_free/v_free (every consumer has read the slot). Scores live in the log2
domain (s * sm_scale * log2 e, one FMA + exp2 per score).

Limits (unsupported() names them): bfloat16/float16, head_dim 64/80/96/128
(native: the smem tiles take the largest swizzle that divides the row, so no
padding), seq_q a multiple of 128, seq_kv a multiple of the key block, no
segment_ids.
"""
import dataclasses
import functools
import heapq
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_INF = float('-inf')

ROWS_WG = 64  # wgmma's M: query (or key) rows per consumer warpgroup
NUM_CONSUMERS = 2  # the backward's, and the forward's by default
BLOCK_Q = ROWS_WG * NUM_CONSUMERS  # seq_q is a multiple of it
HEAD_DIMS = (64, 80, 96, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
# Registers per thread after reallocation: 2 x 128 consumer threads x 240
# + 128 producer threads x 24 <= 64K, the register file; with three
# consumers, 3 x 128 x 160 + 128 x 24.
CONSUMER_REGS = {2: 240, 3: 160}
PRODUCER_REGS = 24
# approx_math: approximate exp2 and log. No reduction scratch: every
# reduction here runs along a WGMMA tile's rows, within a warp, and the 2 KiB
# Pallas reserves by default for cross-warp ones is what kept a third K/V
# stage out of the d128 forward.
COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True,
                                       reduction_scratch_bytes=0)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Forward tuning knobs (static; the defaults are the measured ones).

  block_k: keys per pipeline step (a multiple of 64).
  num_stages: K/V slots in shared memory.
  pingpong: the two consumers take turns on the tensor cores: both meet at a
    shared mbarrier right after issuing a step's wgmmas and again after its
    softmax, warpgroup 1 starting one meeting late, so one's softmax runs
    under the other's matmuls (FA3's inter-warpgroup ping-pong).
  overlap: step j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together and
    runs softmax(S_j) while P V is still on the tensor cores (FA3's
    intra-warpgroup pipelining); O is accumulated in place in the wgmma
    accumulator. Costs registers: S_j, O and P_{j-1} are live at once.
  persistent: one CTA per SM, each running every SM-count-th (query block,
    head, batch row) tile (fwd_tile's order) in turn: the producer streams
    the next tile's K and V while the consumers finish the current one, and
    each consumer loads its next Q during the current tile (two Q/O
    buffers) and stores O without waiting, so a short tile's prologue and
    epilogue overlap its neighbours' work. Otherwise one CTA per tile.
  stagger: without ping-pong, warpgroup w starts each tile once warpgroup
    w - 1 has issued the tile's first wgmmas, and they meet no more, so tiles
    do not begin with every softmax at once while the tensor cores idle.
  consumers: consumer warpgroups, 2 or 3 (64 query rows each; 3 have 160
    registers a thread, not 240): with three, two softmaxes can run under a
    third's matmuls (FA3's 192-row tiles at d64; at d80 and d96 with some
    spills). The last query block of a sequence that 192 does not divide
    has consumers with no rows: they only pass the K/V slots on.
  split_tail: persistent without the mask, two consumers: when the tiles do
    not divide evenly among the CTAs, the last (tiles mod CTAs) tiles are cut
    along the keys into one share of key blocks per CTA (stream-K), so every
    CTA ends at about the same time instead of some running one more tile
    while the rest idle. A CTA's share spans at most two tiles; it writes
    each part's normalized O (as a bf16/fp16 pair, high and low, about 16
    bits of mantissa) and lse to a workspace that the wrapper merges by lse.
  balance: persistent: tiles go to CTAs by list scheduling on their key
    steps (in launch order, each to the CTA that frees up first; a table
    made when tracing), not every SM-count-th to each. With the mask, tile
    costs differ (1 to num_k steps), and dealing them round-robin leaves
    some CTAs up to 3% (d64, 4096 keys) or 49% (d128, 1024 keys) more steps
    than the mean; list scheduling 0.4% and 3.1%.
  own_steps: with the mask and without ping-pong, each consumer runs the
    key blocks its own 64 rows see (kv_steps of its rows), not the tile's,
    and only passes the K/V slots of the rest on: with three consumers
    (192-row tiles, 128-key blocks) consumer 0 and often 1 would otherwise
    run a step whose keys all lie past their rows, and masks one more.
  """

  block_k: int = 128
  num_stages: int = 2
  pingpong: bool = False
  overlap: bool = False
  persistent: bool = False
  stagger: bool = False
  consumers: int = NUM_CONSUMERS
  split_tail: bool = False
  balance: bool = False
  own_steps: bool = False

  def __post_init__(self):
    if self.split_tail and not (self.persistent and self.consumers == 2):
      raise ValueError('split_tail needs persistent and two consumers')
    if self.balance and not self.persistent:
      raise ValueError('balance is for the persistent forward')
    if self.balance and self.split_tail:
      raise ValueError('balance is for tiles of unequal cost (the causal '
                       'mask), split_tail for equal ones: not both')
    if self.stagger and self.pingpong:
      raise ValueError('stagger is for schedules without pingpong')
    if self.consumers not in CONSUMER_REGS:
      raise ValueError(f'consumers must be one of {tuple(CONSUMER_REGS)}, '
                       f'got {self.consumers}')
    if self.pingpong and self.consumers != 2:
      raise ValueError('pingpong takes two consumers')
    if self.own_steps and self.pingpong:  # its meetings pair up the steps
      raise ValueError('own_steps is for schedules without pingpong')

  @property
  def block_q(self):
    """Query rows per tile."""
    return ROWS_WG * self.consumers

  @classmethod
  def default(cls, head_dim, causal, seq_kv):
    """The fastest measured on an H200 or H100 (kernels/NOTES.md); the key
    block is 128 unless a 256 one divides seq_kv.
    - d64: ping-pong, persistent always without the mask and up to 4096 keys
      with it (+16% at s2048 causal, +8% at s4096; at 8192 a tie, at 16384
      4% lost). From 8192 keys three consumers, overlap, staggered
      (2026-12-03: 7.6-9.7% less time without the mask, persistent above
      8192 keys; causal 2.9-4.7%; ties at 2048-4096 keys).
    - d80 and d96: ping-pong persistent up to 8192 keys (2026-12-02,
      against overlap: 5-9% less time at 1024-2048 keys d80 non-causal,
      8-13% at d96 s1024, elsewhere 1-7% or a tie; d96 s4096 non-causal
      1.4% more); above, as d128 (at 16384 keys 12-13% less time causal,
      4.4% d96 non-causal; d80 non-causal 2% more, within run spread).
      From 8192 keys, except d96 without the mask, three consumers,
      staggered, with overlap at d80 without the mask (2026-12-04: 5.4-8%
      less time there, 3-4.6% d80 causal, 4.5-12.7% d96 causal; d96
      without the mask 1-3% more).
    - d128: overlap, persistent up to 512 keys (causal at 1024-4096 keys
      persistent took 12-15% more). From 1024 keys staggered, without the
      mask persistent up to 2048 keys (2026-12-03: causal 1.6-2.3% less
      time than overlap at 2048-16384 keys; without the mask 2.7% less
      than ping-pong persistent at 1024 keys, 4.5% at 2048, within 1% of
      overlap above).
    - 2026-12-07 (H100): persistent forwards with the mask deal their tiles
      by list scheduling (balance: d128 5.6-8.8% less time at 1024-2048
      keys, where it now is persistent; at 4096-16384 it lost 1-5%; seed
      d80 14%, d64 1-4%); without it, from 4096 keys, the tail split
      along the keys (d128 1.6-3.5% less time, d64 1.7%; at 2048 3% more).
    - 2026-12-08 (H100): d64 with the mask from 4096 keys, three staggered
      consumers with overlap, each its own key blocks (own_steps: 2.5%
      less time than ping-pong persistent at 4096, 4.4% and 7.8% less than
      without own_steps at 8192 and 16384)."""
    if head_dim <= 64 and (seq_kv >= 8192 or causal and seq_kv >= 4096):
      return cls(128, 2, overlap=True, stagger=True, consumers=3,
                 persistent=not causal and seq_kv > 8192, own_steps=causal)
    if head_dim <= 64:  # a 256-key block only without the mask
      tiles = dict(persistent=True, balance=causal,
                   split_tail=not causal and seq_kv >= 4096)
      if not causal and seq_kv % 256 == 0:
        return cls(256, 2, pingpong=True, **tiles)
      return cls(128, 3, pingpong=True, **tiles)
    if head_dim < 128 and seq_kv >= 8192 and (causal or head_dim <= 80):
      return cls(128, 2, overlap=not causal, stagger=True, consumers=3)
    if head_dim < 128 and seq_kv <= 8192:
      return cls(128, 2, pingpong=True, persistent=True, balance=causal)
    # Shared memory (bf16): Q/O 128 x d (persistent: twice), plus stages x 2
    # x block_k x d for K and V: d128 with 3 stages takes 224.6 KiB of the
    # 227 (persistent 256: past it).
    stagger = head_dim == 128 and seq_kv > 512
    split_tail = stagger and not causal and seq_kv >= 4096
    balance = causal and seq_kv <= 2048
    persistent = (seq_kv <= 512 or balance or split_tail or
                  stagger and not causal and seq_kv <= 2048)
    return cls(block_k=128, num_stages=2, overlap=True, persistent=persistent,
               stagger=stagger, split_tail=split_tail, balance=balance)


def unsupported(q, k, *, has_segments, block_k=MosaicConfig.block_k):
  """Why the Mosaic kernels cannot run these inputs, or None if they can.

  q, k: arrays or ShapeDtypeStructs that already passed check_qkv.
  """
  seq_q, head_dim = q.shape[1], q.shape[3]
  seq_kv = k.shape[1]
  if q.dtype not in DTYPES:
    return f'needs bfloat16 or float16 inputs, got {q.dtype}'
  if head_dim not in HEAD_DIMS:
    return f'needs head_dim in {HEAD_DIMS}, got {head_dim}'
  if seq_q % BLOCK_Q:
    return f'needs seq_q a multiple of {BLOCK_Q}, got {seq_q}'
  if seq_kv % block_k:
    return f'needs seq_kv a multiple of {block_k}, got {seq_kv}'
  if has_segments:
    return 'does not support segment_ids'
  return None


def tile_transforms(minor, dtype):
  """Tiling + swizzle for a shared-memory tile whose rows hold `minor`
  elements: the widest swizzle dividing the row (128 B for d 64/128, 64 B for
  d96, 32 B for d80), as TMA and wgmma need the row split into swizzle-wide
  column tiles."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits, 'attention tile')
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


def smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=tile_transforms(shape[-1], dtype))


def mma(a, b, shape, after_issue=None):
  """a @ b on the tensor cores (wgmma) into a fresh float32 accumulator.

  a: smem ref, or registers in the WGMMA layout; b: smem ref (maybe a
  transposed view). after_issue() runs while the wgmma is in flight. Waits for
  the result.
  """
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def seed_acc(acc_ref, value, interpret):
  """Starts a fresh wgmma accumulator at `value`, so wgmma adds in place (no
  second register tile). The interpreter has no accumulator store: there it
  stays at 0 and read_acc adds `value` (its wgmma is synchronous)."""
  if not interpret:
    acc_ref[...] = value


def read_acc(acc_ref, value, interpret):
  """The accumulator seeded by seed_acc(acc_ref, value), after all wgmmas."""
  return acc_ref[...] + value if interpret else acc_ref[...]


def wgmma_full(shape, value):
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32),
                           plgpu.Layout.WGMMA)


def wgmma_rows(rows, value):
  """A [rows] vector in the layout of a WGMMA tile's row reductions."""
  return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32),
                           plgpu.Layout.WGMMA.reduce(1))


def wgmma_iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim,
                                layout=plgpu.Layout.WGMMA)


def rows_col(x, shape):
  """[rows] -> [rows, cols]."""
  return lax.broadcast_in_dim(x, shape, (0,))


def cols_from(first, shape, *, at_most=True):
  """The causal mask of a WGMMA tile as a per-row bound on its column index:
  col <= first + row (at_most) or col >= first + row. Against a [rows, cols]
  tile of positions kept across the loop, ptxas spilled up to 370 B (the
  256-key d64 forward, the persistent d128 backward); the bound is two
  registers a thread, and ptxas rebuilds the column indices as it needs
  them. (bound - col against 0 spilled 4-16 B less than col against
  bound.)"""
  bound = rows_col(first + plgpu.layout_cast(
      lax.broadcasted_iota(jnp.int32, shape[:1], 0),
      plgpu.Layout.WGMMA.reduce(1)), shape)
  ahead = bound - wgmma_iota(shape, 1)
  return ahead >= 0 if at_most else ahead <= 0


def interpret_params(interpret):
  """True, or InterpretGPUParams (e.g. detect_races=True): Mosaic GPU
  interpret mode on CPU."""
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def kv_steps(q_start, rows, block_k, seq_kv, causal_offset):
  """(unmasked, total) key blocks for query rows [q_start, q_start + rows):
  blocks past the causal diagonal are never visited; the first `unmasked`
  ones are fully visible to every row."""
  num_k = seq_kv // block_k
  if causal_offset is None:
    return num_k, num_k
  last = q_start + rows + causal_offset  # keys < last are visible to some row
  total = jnp.clip(lax.div(jnp.maximum(last, 0) + block_k - 1, block_k),
                   0, num_k)
  first = q_start + causal_offset + 1  # keys < first are visible to all rows
  unmasked = jnp.clip(lax.div(jnp.maximum(first, 0), block_k), 0, total)
  return unmasked, total


def produce(groups, steps, num_stages, base=0, drain=True):
  """The producer warpgroup's loop: step i refills slot (base + i) % stages;
  base counts the steps that came before in this CTA (a persistent CTA's
  earlier tiles), so the ring and its barrier phases carry on.

  groups: [(free, [(load, ready), ...])]: the loads wait for the consumers to
  arrive on free[slot] once the slot has been filled before;
  load(step, slot, ready[slot]) issues one TMA copy.
  drain: end by waiting for the last frees too (drain_frees).
  """
  def issue(i, wait):  # wait: True, False or a traced condition
    slot = lax.rem(base + i, num_stages)
    for free, loads in groups:
      with jax.named_scope('wait_free'):
        if wait is True:
          plgpu.barrier_wait(free.at[slot])
        elif wait is not False:
          pl.when(wait)(functools.partial(plgpu.barrier_wait, free.at[slot]))
      with jax.named_scope('load'):
        for load, ready in loads:
          load(i, slot, ready.at[slot])

  if isinstance(base, int) and base == 0:
    # The first fills unrolled, then a loop that always waits: a wait under
    # a condition in the loop made the causal d128 forward 4% slower (H200).
    for i in range(num_stages):
      pl.when(i < steps)(functools.partial(issue, jnp.int32(i), False))

    @pl.loop(num_stages, jnp.maximum(steps, num_stages))
    def _(i):
      issue(i, True)
  else:
    @pl.loop(0, steps)
    def _(i):
      issue(i, base + i >= num_stages)

  if drain:
    drain_frees([free for free, _ in groups], base + steps, num_stages)


def drain_frees(frees, total, num_stages):
  """Waits on `frees` for the last slots filled (of `total` steps), so
  every barrier completion is observed: mbarrier phases stay in step (the
  interpreter checks this)."""
  @pl.loop(jnp.maximum(total - num_stages, 0), total)
  def _(g):
    for free in frees:
      plgpu.barrier_wait(free.at[lax.rem(g, num_stages)])


def tma_loader(src_ref, dst_smem, index):
  """load(step, slot, barrier) for produce(): the tile src_ref.at[index(step)]
  into dst_smem[slot]."""
  def load(step, slot, barrier):
    plgpu.copy_gmem_to_smem(src_ref.at[index(step)], dst_smem.at[slot],
                            barrier)
  return load


def stage_lhs(x, stage_ref):
  """wgmma's A operand: registers on the GPU; in interpret mode (stage_ref
  given) through shared memory, which is all the interpreter's wgmma reads."""
  if stage_ref is None:
    return x
  stage_ref[...] = x
  plgpu.commit_smem()
  return stage_ref


def meet_at(turn):
  """Both consumers arrive on `turn`, then wait for each other."""
  with jax.named_scope('meet'):
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def _softmax_step(s, m, l, *, scale, mask):
  """One online-softmax step on raw scores s: (p, m, l, alpha), m in the
  log2 domain; mask: None or the [rows, keys] visibility."""
  if mask is not None:
    s = jnp.where(mask, s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
  # A row that has seen no key yet keeps m = -inf: exponents must not be NaN.
  m_use = m_new if mask is None else jnp.where(m_new == NEG_INF, 0.0, m_new)
  p = jnp.exp2(s * scale - rows_col(m_use, s.shape))
  alpha = jnp.exp2(m - m_use)
  return p, m_new, l * alpha + jnp.sum(p, axis=1), alpha


def fwd_tile(t, num_q, heads, batch, causal):
  """(query block, head, batch row) of tile t, in launch order. Causal: per
  batch row, the longest query blocks first, across its heads, so the
  diagonal's short tiles run last, in the shade of the long ones. Otherwise
  a head's query blocks follow each other, so they read its K and V from
  L2."""
  if causal:
    i = num_q - 1 - lax.rem(lax.div(t, heads), num_q)
    return i, lax.rem(t, heads), lax.div(t, heads * num_q)
  return lax.rem(t, num_q), lax.rem(lax.div(t, num_q), heads), lax.div(
      t, num_q * heads)


def tail_part(cta, m, ctas, tiles, num_k):
  """split_tail: CTA cta's m-th part (m 0 or 1) of the last tiles % ctas
  tiles, whose key blocks, in tile order, are dealt out as one run of
  consecutive blocks per CTA: (tail tile, its first key block, key blocks;
  0 blocks: no such part). A run is shorter than a tile, so it spans at
  most two."""
  blocks = (tiles % ctas) * num_k
  start = lax.div(cta * blocks, ctas)
  end = lax.div((cta + 1) * blocks, ctas)
  t = lax.div(start, num_k) + m
  first = jnp.maximum(start - t * num_k, 0)
  return t, first, jnp.maximum(jnp.minimum(end - t * num_k, num_k) - first,
                               0)


def tail_parts(cta, ctas, tiles, num_k):
  """How many parts CTA cta has (0, 1 or 2)."""
  return sum(jnp.where(tail_part(cta, m, ctas, tiles, num_k)[2] > 0, 1, 0)
             for m in (0, 1))


def list_schedule(steps, ctas):
  """balance: (order [ctas, most tiles] int32, count [ctas] int32), CTA c
  running tiles order[c, :count[c]]: tiles in launch order, each to the CTA
  with the fewest steps so far, a tile costing its `steps` plus one (its own
  tiles' load and output store, about a step's time)."""
  free = [(0, c) for c in range(ctas)]  # (steps so far, cta): a heap
  tiles = [[] for _ in range(ctas)]
  for t, cost in enumerate(np.asarray(steps).tolist()):
    load, c = heapq.heappop(free)
    tiles[c].append(t)
    heapq.heappush(free, (load + cost + 1, c))
  order = np.zeros((ctas, max(map(len, tiles))), np.int32)
  for c, mine in enumerate(tiles):
    order[c, :len(mine)] = mine
  return order, np.array(list(map(len, tiles)), np.int32)


def balanced_order(ctas, num_q, heads, batch, block_q, block_k, seq_kv,
                   causal):
  """list_schedule of the forward's tiles in fwd_tile's order."""
  with jax.ensure_compile_time_eval():
    i, _, _ = fwd_tile(jnp.arange(num_q * heads * batch), num_q, heads,
                       batch, causal)
    _, steps = kv_steps(i * block_q, block_q, block_k, seq_kv,
                        seq_kv - num_q * block_q if causal else None)
    return list_schedule(np.broadcast_to(np.asarray(steps), i.shape), ctas)


def merge_tail(o, lse, part_o, part_lse, *, ctas, block_q, num_k):
  """split_tail's last step: each split tile's parts (normalized O as high
  and low halves, lse) weighed by exp(lse_part - lse), into o and lse."""
  batch, seq_q, heads, head_dim = o.shape
  num_q = seq_q // block_q
  tiles = num_q * heads * batch
  with jax.ensure_compile_time_eval():  # the plan: static
    cta = jnp.arange(ctas)
    slots = [[] for _ in range(tiles % ctas)]
    for m in (0, 1):
      t, _, blocks = map(np.asarray, tail_part(cta, m, ctas, tiles, num_k))
      for c in np.flatnonzero(blocks):
        slots[t[c]].append(2 * c + m)
  width = max(map(len, slots))
  index = np.array([s + s[:1] * (width - len(s)) for s in slots])
  valid = np.array([[j < len(s) for j in range(width)] for s in slots])
  lse_parts = jnp.where(valid[..., None], part_lse[index], NEG_INF)
  lse_tiles = jax.nn.logsumexp(lse_parts, axis=1)
  weights = jnp.exp(lse_parts - lse_tiles[:, None])
  halves = part_o[index].astype(jnp.float32)
  o_tiles = jnp.sum(weights[..., None] * (halves[:, :, 0] + halves[:, :, 1]),
                    axis=1)
  t = tiles - len(slots) + np.arange(len(slots))
  i, h, b = t % num_q, t // num_q % heads, t // (num_q * heads)
  o = o.reshape(batch, num_q, block_q, heads, head_dim).at[b, i, :, h].set(
      o_tiles.astype(o.dtype))
  lse = lse.reshape(batch, heads, num_q, block_q).at[b, h, i].set(lse_tiles)
  return o.reshape(batch, seq_q, heads, head_dim), lse.reshape(
      batch, heads, seq_q)


def _fwd_consumer(refs, smem_refs, bars, *, wg, count, tile, sm_scale,
                  seq_kv, causal_offset, config, interpret):
  """Runs this CTA's `count` tiles (the int 1 without persistence); tile(n)
  is its n-th's (query block, head, batch row, (unmasked, total) steps,
  (first key block, part)): part -1 for a whole tile, else the workspace
  slot of a split tile's part (split_tail).
  sm_scale: a traced float32 scalar (scale_input)."""
  q_ref, o_ref, lse_ref, part_o_ref, part_lse_ref = refs
  qo_smem, k_smem, v_smem, p_smem, lse_smem = smem_refs
  q_bar, k_ready, v_ready, k_free, v_free, turn = bars
  p_smem = None if p_smem is None else p_smem.at[wg]
  seq_q, head_dim = q_ref.shape[1], q_ref.shape[-1]
  dtype = q_ref.dtype
  block_k, num_stages = config.block_k, config.num_stages
  consumers, block_q = config.consumers, config.block_q
  scale = sm_scale * LOG2E
  s_shape = (ROWS_WG, block_k)
  o_shape = (ROWS_WG, head_dim)
  softmax = functools.partial(_softmax_step, scale=scale)

  def my_start(i):  # of query block i
    return i * block_q + wg * ROWS_WG

  def has_rows(i):
    """Whether this warpgroup has rows in query block i: seq_q is a multiple
    of 128, so with two consumers always."""
    return True if consumers == 2 else my_start(i) < seq_q

  def q_ready(buf):
    return q_bar.at[buf * consumers + wg]

  buffers = qo_buffers(config)

  def load_q(n):  # Q, then O, of tile n live in buffer n % buffers
    buf = lax.rem(n, buffers)
    i, h, b, _, _ = tile(n)

    @pl.when(has_rows(i))
    def _():
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(my_start(i), ROWS_WG), h],
                              qo_smem.at[buf, wg], q_ready(buf))

  def meet(now=config.pingpong):
    # With warpgroup 1 one meeting behind, their wgmmas and softmaxes
    # alternate.
    if now:
      meet_at(turn.at[0])

  def meet_next(w):
    """Stagger: warpgroup w meets w + 1 (turn[w])."""
    meet_at(turn.at[0] if consumers == 2 else turn.at[w])

  def run_tile(n, base):
    """Tile n; its step j uses K/V slot (base + j) % stages. Returns base
    plus the tile's steps."""
    buf = lax.rem(n, buffers)
    i, h, b, (unmasked, total), (_, part) = tile(n)
    q_smem = qo_smem.at[buf, wg]

    def prefetch():
      """The next tile's Q into the other buffer, once the TMA store of the
      O that it holds has read it. Runs while step 0's wgmmas are in flight
      (or at the end for a tile without keys)."""
      @pl.when(n + 1 < count)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        load_q(n + 1)

    def after_issue(j):  # of step j's first wgmmas
      if config.persistent:
        pl.when(j == 0)(prefetch)
      if config.stagger:
        pl.when((j == 0) & (wg < consumers - 1))(
            functools.partial(meet_next, wg))
      meet()

    def mask(masked, j):
      if not masked:
        return None
      return cols_from(my_start(i) + causal_offset - j * block_k, s_shape)

    def body(masked, j, carry):
      acc, m, l = carry
      slot = lax.rem(base + j, num_stages)
      with jax.named_scope('wait_k'):
        plgpu.barrier_wait(k_ready.at[slot])
      with jax.named_scope('qk'):
        s = mma(q_smem, k_smem.at[slot].T, s_shape,
                after_issue=functools.partial(after_issue, j))
      plgpu.barrier_arrive(k_free.at[slot])
      with jax.named_scope('softmax'):
        p, m, l, alpha = softmax(s, m, l, mask=mask(masked, j))
      meet()
      p = stage_lhs(p.astype(dtype), p_smem)
      with jax.named_scope('wait_v'):
        plgpu.barrier_wait(v_ready.at[slot])
      with jax.named_scope('pv'):
        pv = mma(p, v_smem.at[slot], o_shape)
      plgpu.barrier_arrive(v_free.at[slot])
      with jax.named_scope('rescale'):
        return acc * rows_col(alpha, acc.shape) + pv, m, l

    def first(masked):
      """Overlap: S_0 and its softmax; O starts at 0."""
      slot = lax.rem(base, num_stages)
      plgpu.barrier_wait(k_ready.at[slot])
      s = mma(q_smem, k_smem.at[slot].T, s_shape,
              after_issue=functools.partial(after_issue, 0))
      plgpu.barrier_arrive(k_free.at[slot])
      p, m, l, _ = softmax(s, wgmma_rows(ROWS_WG, NEG_INF),
                           wgmma_rows(ROWS_WG, 0.0), mask=mask(masked, 0))
      meet()
      return wgmma_full(o_shape, 0.0), m, l, p.astype(dtype)

    def overlapped(masked, j, carry):
      """Overlap, step j >= 1: S_j and P_{j-1} V_{j-1} in flight together."""
      acc, m, l, p_prev = carry
      slot = lax.rem(base + j, num_stages)
      prev = lax.rem(base + j - 1, num_stages)
      with jax.named_scope('wait_kv'):
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[prev])

      def scope(s_ref, o_ref):
        with jax.named_scope('issue'):
          seed_acc(o_ref, acc, interpret)
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
          plgpu.wgmma(o_ref, stage_lhs(p_prev, p_smem), v_smem.at[prev])
        meet()
        with jax.named_scope('wait_s'):
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_j only
        plgpu.barrier_arrive(k_free.at[slot])
        with jax.named_scope('softmax'):
          p, m_new, l_new, alpha = softmax(s, m, l, mask=mask(masked, j))
        with jax.named_scope('wait_pv'):
          o = read_acc(o_ref, acc, interpret)
        return o, p, m_new, l_new, alpha

      o, p, m, l, alpha = pl.run_scoped(scope,
                                        plgpu.ACC(s_shape, jnp.float32),
                                        plgpu.ACC(o_shape, jnp.float32))
      plgpu.barrier_arrive(v_free.at[prev])
      meet()
      # o holds P_{j-1} V_{j-1}, taken against m_{j-1}: rescale to m_j.
      with jax.named_scope('rescale'):
        return o * rows_col(alpha, o.shape), m, l, p.astype(dtype)

    def last(steps, carry):
      """Overlap: O += P V of the last of `steps`."""
      acc, m, l, p = carry
      slot = lax.rem(base + steps - 1, num_stages)
      plgpu.barrier_wait(v_ready.at[slot])

      def scope(o_ref):
        seed_acc(o_ref, acc, interpret)
        plgpu.wgmma(o_ref, stage_lhs(p, p_smem), v_smem.at[slot])
        meet()
        return read_acc(o_ref, acc, interpret)

      acc = pl.run_scoped(scope, plgpu.ACC(o_shape, jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m, l

    def pass_on(start):
      """Frees the K/V slots of steps start to total once they are filled
      (the barriers' phases stay in step) without using them."""
      @pl.loop(start, total)
      def _(j):
        slot = lax.rem(base + j, num_stages)
        for ready, free in ((k_ready, k_free), (v_ready, v_free)):
          plgpu.barrier_wait(ready.at[slot])
          plgpu.barrier_arrive(free.at[slot])

    def idle():
      """No rows here: pass every slot on and keep the stagger's meetings."""
      if config.stagger:
        pl.when((wg > 0) & (total > 0))(functools.partial(meet_next, wg - 1))
        pl.when((wg < consumers - 1) & (total > 0))(
            functools.partial(meet_next, wg))
      pass_on(0)
      if config.persistent:
        prefetch()

    def attend():
      causal = causal_offset is not None
      init = (wgmma_full(o_shape, 0.0), wgmma_rows(ROWS_WG, NEG_INF),
              wgmma_rows(ROWS_WG, 0.0))
      own = config.own_steps and causal
      # Without own_steps the consumers share `total`, so they skip (no
      # keys at all) together.
      mine, steps = (kv_steps(my_start(i), ROWS_WG, block_k, seq_kv,
                              causal_offset) if own else (unmasked, total))
      with jax.named_scope('wait_q'):
        plgpu.barrier_wait(q_ready(buf))
      pl.when(wg == 1)(meet)
      if config.stagger:  # tiles without keys issue nothing: no meeting
        pl.when((wg > 0) & (total > 0))(functools.partial(meet_next, wg - 1))
        if own:  # keys for the others, none for these rows: meet as step 0
          pl.when((wg < consumers - 1) & (steps == 0) & (total > 0))(
              functools.partial(meet_next, wg))
      if config.overlap:
        carry = lax.cond(
            steps > 0, lambda: first(causal),
            lambda: (*init, wgmma_full(s_shape, 0.0).astype(dtype)))
        carry = lax.fori_loop(1, jnp.maximum(mine, 1),
                              functools.partial(overlapped, False), carry)
        if causal:
          carry = lax.fori_loop(jnp.maximum(mine, 1), steps,
                                functools.partial(overlapped, True), carry)
        acc, m, l = lax.cond(steps > 0, functools.partial(last, steps),
                             lambda c: c[:3], carry)
      else:
        carry = lax.fori_loop(0, mine, functools.partial(body, False), init)
        if causal:
          carry = lax.fori_loop(mine, steps, functools.partial(body, True),
                                carry)
        acc, m, l = carry
      if own:
        pass_on(steps)
      if config.persistent:
        pl.when(steps == 0)(prefetch)
      pl.when(wg == 0)(meet)
      with jax.named_scope('epilogue'):
        # Rows that saw no key (l == 0) give o = 0 and lse = -inf.
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o = acc * rows_col(1.0 / l_safe, acc.shape)
        q_smem[...] = o.astype(dtype)
        lse_smem.at[buf, wg][...] = jnp.where(empty, NEG_INF,
                                              m * LN2 + jnp.log(l_safe))
        plgpu.commit_smem()

        def store_tile():
          rows = pl.ds(my_start(i), ROWS_WG)
          plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, rows, h])
          plgpu.copy_smem_to_gmem(lse_smem.at[buf, wg],
                                  lse_ref.at[b, h, rows])

        def store_part():
          """O as high and low halves through the same buffer: no smem is
          left for a float32 tile at d128."""
          rows = pl.ds(wg * ROWS_WG, ROWS_WG)
          plgpu.copy_smem_to_gmem(q_smem, part_o_ref.at[part, 0, rows])
          plgpu.copy_smem_to_gmem(lse_smem.at[buf, wg],
                                  part_lse_ref.at[part, rows])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          q_smem[...] = (o - o.astype(dtype).astype(jnp.float32)).astype(
              dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(q_smem, part_o_ref.at[part, 1, rows])

        if config.split_tail:
          lax.cond(part < 0, store_tile, store_part)
        else:
          store_tile()

    if consumers == 2:
      attend()
    else:
      lax.cond(has_rows(i), attend, idle)
    return base + total

  load_q(0)
  over_tiles(count, run_tile)
  plgpu.wait_smem_to_gmem(0)


def _fwd_kernel(q_ref, k_ref, v_ref, scale_ref, *refs, causal, group, config,
                interpret):
  if config.balance:  # inputs: each CTA's tiles and how many
    order_ref, count_ref, *refs = refs
  if config.split_tail:
    o_ref, lse_ref, part_o_ref, part_lse_ref, *scratch = refs
  else:
    (o_ref, lse_ref, *scratch), part_o_ref, part_lse_ref = refs, None, None
  (qo_smem, k_smem, v_smem, p_smem, lse_smem, q_bar, k_ready, v_ready, k_free,
   v_free, turn) = scratch
  batch, seq_q, heads, _ = q_ref.shape
  seq_kv = k_ref.shape[1]
  block_k, num_stages = config.block_k, config.num_stages
  causal_offset = seq_kv - seq_q if causal else None
  block_q, consumers = config.block_q, config.consumers
  num_q = pl.cdiv(seq_q, block_q)
  num_k = seq_kv // block_k
  tiles = num_q * heads * batch
  whole = (num_k, (0, -1))  # all key blocks, written to o_ref and lse_ref
  if config.split_tail:  # tiles cta, cta + ctas, ..., then its tail parts
    cta, ctas = lax.axis_index('cta'), lax.axis_size('cta')
    rounds = tiles // ctas
    count = rounds + tail_parts(cta, ctas, tiles, num_k)

    def tile_index(n):
      t, first, blocks = tail_part(cta, n - rounds, ctas, tiles, num_k)
      in_tail = n >= rounds
      t = jnp.where(in_tail, rounds * ctas + t, cta + n * ctas)
      split = (jnp.where(in_tail, blocks, num_k),
               (jnp.where(in_tail, first, 0),
                jnp.where(in_tail, 2 * cta + n - rounds, -1)))
      return *fwd_tile(t, num_q, heads, batch, causal), split
  elif config.balance:
    cta = lax.axis_index('cta')
    count = count_ref[cta]
    tile_index = lambda n: (*fwd_tile(order_ref[cta, n], num_q, heads, batch,
                                      causal), whole)
  elif config.persistent:  # tiles cta, cta + ctas, ...
    cta, ctas = lax.axis_index('cta'), lax.axis_size('cta')
    count = lax.div(tiles - cta + ctas - 1, ctas)
    tile_index = lambda n: (*fwd_tile(cta + n * ctas, num_q, heads, batch,
                                      causal), whole)
  else:  # one tile per CTA; causal: the longest rows first
    q = lax.axis_index('q')
    count = 1
    tile_index = lambda n: (num_q - 1 - q if causal else q,
                            lax.axis_index('h'), lax.axis_index('b'), whole)

  def tile(n):  # what the consumers and the producer agree on
    i, h, b, (blocks, part) = tile_index(n)
    if causal:
      steps = kv_steps(i * block_q, block_q, block_k, seq_kv, causal_offset)
    else:
      steps = (blocks, blocks)
    return i, h, b, steps, part

  wg = lax.axis_index('wg')

  @pl.when(wg < consumers)
  def _():
    plgpu.set_max_registers(CONSUMER_REGS[consumers], action='increase')
    _fwd_consumer(
        (q_ref, o_ref, lse_ref, part_o_ref, part_lse_ref),
        (qo_smem, k_smem, v_smem, p_smem, lse_smem),
        (q_bar, k_ready, v_ready, k_free, v_free, turn), wg=wg,
        count=count, tile=tile, sm_scale=scale_ref[0], seq_kv=seq_kv,
        causal_offset=causal_offset, config=config, interpret=interpret)

  @pl.when(wg == consumers)
  def _():
    plgpu.set_max_registers(PRODUCER_REGS, action='decrease')

    def produce_tile(n, base):
      _, h, b, (_, total), (first, _) = tile(n)
      index = lambda step: (b, pl.ds((first + step) * block_k, block_k),
                            lax.div(h, group))
      produce([(k_free, [(tma_loader(k_ref, k_smem, index), k_ready)]),
               (v_free, [(tma_loader(v_ref, v_smem, index), v_ready)])],
              total, num_stages, base=base, drain=False)
      return base + total

    steps = over_tiles(count, produce_tile)
    drain_frees([k_free, v_free], steps, num_stages)


def over_tiles(count, run_tile):
  """Runs steps = run_tile(n, steps) for n < count from steps = 0: the K/V
  steps of all a CTA's tiles. count the int 1 (a CTA per tile): no loop,
  so that kernel stays as simple as one without persistence."""
  if isinstance(count, int) and count == 1:
    return run_tile(0, 0)
  return lax.fori_loop(0, count, run_tile, jnp.int32(0))


def scale_input(sm_scale):
  """sm_scale as a kernel input rather than a constant in the kernel: models
  scale each layer differently (GPT-2's scale_attn_by_inverse_layer_idx), and
  one compiled kernel then serves every layer."""
  return jnp.full((1,), sm_scale, jnp.float32)


def flash_fwd(q, k, v, *, sm_scale, causal, interpret, config=None):
  """(o [b, s_q, h, d], lse float32 [b, h, s_q]); inputs validated and
  unsupported() is None. interpret=True: Mosaic GPU interpret mode (CPU)."""
  config = config or MosaicConfig.default(q.shape[3], causal, k.shape[1])
  if config.split_tail and causal:
    raise ValueError('MosaicConfig.split_tail is for attention without the '
                     'causal mask (its tiles differ in cost)')
  return _flash_fwd(q, k, v, scale_input(sm_scale), causal=causal,
                    interpret=interpret, config=config)


# jit: layers that differ only in sm_scale trace and lower the kernel once.
@functools.partial(jax.jit, static_argnames=('causal', 'interpret', 'config'))
def _flash_fwd(q, k, v, scale, *, causal, interpret, config):
  batch, seq_q, heads, head_dim = q.shape
  group = heads // k.shape[2]
  stages, block_k = config.num_stages, config.block_k
  kv_tile = (stages, block_k, head_dim)
  consumers = config.consumers
  freed = plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)
  # Q, then O; persistent: of a CTA's even and odd tiles.
  buffers = qo_buffers(config)
  scratch = [
      smem((buffers, consumers, ROWS_WG, head_dim), q.dtype),
      smem(kv_tile, q.dtype), smem(kv_tile, q.dtype),
      # The interpreter's wgmma reads A only from shared memory; on the GPU,
      # P goes from registers.
      (smem((consumers, ROWS_WG, block_k), q.dtype)
       if interpret_params(interpret) else None),
      plgpu.SMEM((buffers, consumers, ROWS_WG), jnp.float32),
      plgpu.Barrier(num_barriers=buffers * consumers),
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      freed, freed,
      # Ping-pong's meeting; the stagger's, of warpgroups w and w + 1.
      plgpu.Barrier(num_arrivals=2, num_barriers=consumers - 1),
  ]
  num_q = pl.cdiv(seq_q, config.block_q)
  ctas = min(num_q * heads * batch, persistent_ctas(interpret))
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32))
  split = config.split_tail and (num_q * heads * batch) % ctas
  if split:  # the workspace: two parts a CTA
    out_type += (jax.ShapeDtypeStruct((2 * ctas, 2, config.block_q, head_dim),
                                      q.dtype),
                 jax.ShapeDtypeStruct((2 * ctas, config.block_q), jnp.float32))
  elif config.split_tail:  # every CTA runs as many tiles
    config = dataclasses.replace(config, split_tail=False)
  kernel = functools.partial(
      _fwd_kernel, causal=causal, group=group, config=config,
      interpret=interpret_params(interpret) is not None)
  tables = (balanced_order(ctas, num_q, heads, batch, config.block_q, block_k,
                           k.shape[1], causal)
            if config.balance else ())
  out = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(ctas,) if config.persistent else (heads, num_q, batch),
      grid_names=('cta',) if config.persistent else ('h', 'q', 'b'),
      num_threads=consumers + 1,
      thread_name='wg',
      compiler_params=COMPILER_PARAMS,
      interpret=interpret_params(interpret),
  )(q, k, v, scale, *tables)
  if split:
    return merge_tail(*out, ctas=ctas, block_q=config.block_q,
                      num_k=k.shape[1] // block_k)
  return out


def qo_buffers(config):
  """Q/O buffers: persistent, two, so the next tile's Q loads while the
  current tile runs."""
  return 2 if config.persistent else 1


def persistent_ctas(interpret):
  """CTAs of a persistent kernel: one per SM; in interpret mode 3, so that
  each CTA runs several tiles and the tiles need not divide evenly."""
  if interpret_params(interpret):
    return 3
  try:
    return jax.devices('gpu')[0].core_count
  except RuntimeError:  # lowering for CUDA on a machine without a GPU
    return 132  # H100 and H200 SXM
