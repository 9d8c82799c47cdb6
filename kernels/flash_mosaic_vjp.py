"""FlashAttention backward for Hopper in Pallas Mosaic GPU: delta = rowsum(dO
* O) in XLA, then two warp-specialized kernels that recompute P = exp(s - lse)
from the given lse:
  - dK/dV: one CTA per 128 keys (64 per consumer warpgroup), looping over the
    query blocks of every q head of its kv head (GQA sums in registers);
  - dQ: one CTA per 128 query rows, looping over key blocks (the forward's
    structure).
Two kernels and no atomics: dQ is written once, in order. The cost is
recomputing S and dP in the dQ kernel (7 matmuls instead of 5). Both may
run persistent (MosaicBwdConfig.persistent: one CTA per SM, tiles in turn).
Or fused (MosaicBwdConfig.fused; the default at d64): the dK/dV kernel also
computes dQ and reduce-adds it into a float32 dQ with TMA.

Nothing here assumes lse came from the same K/V: ring attention passes the
global lse, o and dO of a query chunk against one K/V chunk.
"""
import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import flash_mosaic as fm

BLOCK_K = fm.ROWS_WG * fm.NUM_CONSUMERS  # keys per dK/dV CTA
CONSUMER_REGS = fm.CONSUMER_REGS[fm.NUM_CONSUMERS]
# dQ = dS K takes both operands from smem, which Mosaic's wgmma needs equally
# swizzled: dS^T rows (64 queries) take 128 B, so K rows must too.
FUSED_HEAD_DIMS = (64, 128)
DQ_COLS = 64  # fused dQ is computed and reduced in parts of 64 columns


@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """Backward tuning knobs (static; the defaults are the measured ones).

  block_q: query rows per dK/dV step; block_k: keys per dQ step;
  num_stages: slots of each streamed tile.
  fused: no dQ kernel: the dK/dV kernel also computes dQ = dS K (5 matmuls
    instead of 7, no second exp of S) and adds it into a float32 dQ in HBM
    with TMA reduce-adds. Both consumers write their 64 keys' dS^T to a
    shared smem tile; dQ over all 128 keys is computed in 64-column parts
    (dq_part: at d128 one per consumer every step, at d64 in turns). Needs
    block_q == 64 (wgmma's M), head_dim in FUSED_HEAD_DIMS, and an extra
    float32 pass over dQ.
  stagger: two kernels, warpgroup 1 starts once warpgroup 0 has issued its
    first step's wgmmas (as the forward's MosaicConfig.stagger), so their
    exp2 and dS run while the other's matmuls do.
  persistent: two kernels, each with one CTA per SM running every
    SM-count-th tile (128 keys, or 128 query rows) in turn (as the forward's
    MosaicConfig.persistent): the producer streams on into the next tile,
    and each consumer loads its next own tiles (K and V, or Q and dO; two
    buffers) during the current tile and stores its outputs without
    waiting, so a tile's prologue and epilogue overlap its neighbours'
    work. At d128 the dQ kernel has room for one Q/dO buffer: a tile loads
    its own at its start.
  balance: persistent: each kernel's tiles go to CTAs by list scheduling on
    their steps (fm.list_schedule, as the forward's MosaicConfig.balance),
    not every SM-count-th to each: with the mask a dK/dV tile has 1 to
    group * seq_q / block_q steps and a dQ tile 1 to seq_kv / block_k.
  late_dq_store: fused: step j's dQ part is stored to smem and reduce-added
    once step j + 1's S^T and dP^T are issued, not before, so the tensor
    cores run them during the store (knock-outs put 1.3 ms of the s8192
    d128 backward in the float32 store and 0.7 in the reduce).
  """
  block_q: int = 64
  block_k: int = 64
  num_stages: int = 2
  fused: bool = False
  stagger: bool = False
  persistent: bool = False
  late_dq_store: bool = False
  balance: bool = False

  @classmethod
  def default(cls, head_dim, causal):
    """The fastest measured (kernels/NOTES.md): at d64 fused with 2 stages
    (H200, 2026-12-02: 3 stages spill since the dQ buffer race fix and lost
    up to 13% causal), without the mask each step's dQ stored during the
    next (H100, 2026-12-07: 2% less time at s2048; with the mask not yet
    measured). Above d64 two kernels, staggered
    (H200, 2026-12-03: 2-3.5% less time; the fused kernel spills and is
    1.1x slower), persistent with a tile table (H100, 2026-12-07) without
    the mask (4.4-6.4% less time at d128, 1024-4096 keys) and at d80 and
    d96 with it (12% less at 1024 keys, 3% at d96 s8192, +0.8% at d80
    s8192); at d128 with the mask the persistent kernels spill (228-268 B)
    and lose, 6-7% at 8192-16384 keys."""
    if head_dim <= 64:
      return cls(fused=True, late_dq_store=not causal)
    tiled = not causal or head_dim <= 96
    return cls(block_k=128, stagger=True, persistent=tiled, balance=tiled)

  def __post_init__(self):
    if self.fused and self.block_q != fm.ROWS_WG:
      raise ValueError(f'fused needs block_q == {fm.ROWS_WG}, got '
                       f'{self.block_q}')
    if self.fused and self.stagger:  # dQ's dS exchange meets every step
      raise ValueError('stagger is for the two-kernel backward')
    if self.fused and self.persistent:
      raise ValueError('persistent is for the two-kernel backward')
    if self.late_dq_store and not self.fused:
      raise ValueError('late_dq_store is for the fused backward')
    if self.balance and not self.persistent:
      raise ValueError('balance is for the persistent backward')


def _row_stats(ref, dim, *, gmem=False):
  """A [n] float32 vector as registers broadcastable along `dim` of a WGMMA
  tile (dim 1: one value per row; dim 0: one per column). From GMEM, Mosaic
  has only plain (non-vectorized) loads: once per warpgroup, that is fine."""
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(dim),
                    optimized=not gmem)


def _consumer(run_tile, own_refs, refs, smem, bars, *, wg, count, tile,
              **kwargs):
  """A consumer warpgroup's part of its CTA's `count` tiles (the int 1
  without persistence). tile(n): the n-th's (head, batch row, first row,
  ...), whose 64 rows from its first row plus 64 * wg of both own_refs (K
  and V, or Q and dO) this warpgroup owns: they load into buffer n %
  buffers of smem[0] and smem[1] (barriers bars[0] and bars[1]).
  run_tile(refs, smem, bars, wg, buf, base, src, tile, prefetch, **kwargs)
  runs one, its rows src, and returns base plus its steps. Persistent with
  two buffers, it calls prefetch() once its first wgmmas are in flight: the
  next tile's load. With one buffer (prefetch None) a tile loads at its
  start, once the last one's stores have read the buffer."""
  buffers = smem[0].shape[0]
  persistent = not (isinstance(count, int) and count == 1)

  def src(n):
    h, b, start, _ = tile(n)
    return b, pl.ds(start + wg * fm.ROWS_WG, fm.ROWS_WG), h

  def load(n):
    buf = lax.rem(n, buffers)
    for ref, dst, bar in zip(own_refs, smem[:2], bars[:2]):
      plgpu.copy_gmem_to_smem(ref.at[src(n)], dst.at[buf, wg],
                              bar.at[buf * fm.NUM_CONSUMERS + wg])

  def prefetch(n):
    """Tile n + 1's, once the stores from its buffer have read it."""
    @pl.when(n + 1 < count)
    def _():
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      load(n + 1)

  def run(n, base):
    buf = lax.rem(n, buffers)
    if persistent and buffers == 1:
      pl.when(n > 0)(functools.partial(prefetch, n - 1))
    for bar in bars[:2]:
      plgpu.barrier_wait(bar.at[buf * fm.NUM_CONSUMERS + wg])
    return run_tile(refs, smem, bars, wg=wg, buf=buf, base=base, src=src(n),
                    tile=tile(n), prefetch=(functools.partial(prefetch, n)
                                            if buffers > 1 else None),
                    **kwargs)

  load(0)
  fm.over_tiles(count, run)
  plgpu.wait_smem_to_gmem(0)


def _add_to_gmem(x, dst, smem_ref, bar, interpret):
  """dst += x (float32 registers) through smem_ref with a TMA reduce-add.
  The interpreter has no reduce-add: there a load, add and store stand in
  (it runs CTAs one after another, and a CTA's own adds touch distinct
  tiles, so that is exact)."""
  if interpret:
    plgpu.wait_smem_to_gmem(0)
    plgpu.copy_gmem_to_smem(dst, smem_ref, bar)
    plgpu.barrier_wait(bar)
    x = x + smem_ref[...]
  else:  # smem_ref is one of two buffers: the reduce before last read it
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
  smem_ref[...] = x
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem_ref, dst,
                          reduction_op=None if interpret else 'add')


def _dkdv_tile(refs, smem, bars, *, wg, buf, base, src, tile, prefetch,
               group, sm_scale, causal_offset, config, interpret):
  """One tile's steps, from K/V buffer buf, its step j on slot (base + j) %
  stages; prefetch() (persistent) runs once step 0's wgmmas are in flight.
  Returns base plus the tile's steps."""
  q_ref, _, _, dk_ref, dv_ref, dq_ref = refs
  (k_own, v_own, q_smem, do_smem, lse2_smem, delta_smem, stage, ds_smem,
   dq_smem) = smem
  (_, _, q_ready, do_ready, lse_ready, delta_ready, free, ds_ready,
   ds_free, dq_bar, turn) = bars
  kv_h, b, k_start, q_range = tile
  head_dim, dtype = q_ref.shape[-1], q_ref.dtype
  rows = k_start + wg * fm.ROWS_WG
  k_all, k_smem, v_smem = k_own.at[buf], k_own.at[buf, wg], v_own.at[buf, wg]
  stage = None if stage is None else stage.at[wg]
  bq, stages = config.block_q, config.num_stages
  scale = sm_scale * fm.LOG2E
  # Transposed tiles [keys, queries]: dK and dV come out row-major.
  st_shape = (fm.ROWS_WG, bq)
  lo, first_full, num_q = q_range
  per_head = num_q - lo

  parts = head_dim // DQ_COLS
  # d128: two dQ parts, one per consumer every step; d64: one part, the
  # consumers take turns. Issued inside the step right behind dK, so one
  # wait drains dK, dV and dQ (at d64 1-2% less time than a turn after the
  # step, 2026-12-04).
  part_per_consumer = config.fused and parts == fm.NUM_CONSUMERS
  my_part = wg if part_per_consumer else 0
  late = config.late_dq_store  # dQ_j carried into step j + 1

  def computes_dq(step):
    return True if part_per_consumer else lax.rem(step, 2) == wg

  def share_ds(step, ds_t):
    """Fused: this consumer's dS^T to the tile both read dQ from."""
    buf = lax.rem(step, 2)
    plgpu.barrier_wait(ds_free.at[buf])  # its readers two steps back are done
    ds_smem.at[buf, wg][...] = ds_t
    plgpu.commit_smem()
    plgpu.barrier_arrive(ds_ready.at[buf])

  def dq_part(step, part, acc_ref):
    """dQ of the step's query rows, columns of `part`, against all the CTA's
    keys (both consumers' dS^T); waits for every wgmma in flight."""
    buf = lax.rem(step, 2)
    plgpu.barrier_wait(ds_ready.at[buf])
    cols = pl.ds(part * DQ_COLS, DQ_COLS)
    for w in range(fm.NUM_CONSUMERS):
      plgpu.wgmma(acc_ref, ds_smem.at[buf, w].T, k_all.at[w, :, cols])
    dq = acc_ref[...]
    plgpu.barrier_arrive(ds_free.at[buf])
    return dq

  def dq_compute(step, part):
    return pl.run_scoped(functools.partial(dq_part, step, part),
                         plgpu.ACC((bq, DQ_COLS), jnp.float32))

  def dq_of(step, part):
    dq_store(step, part, dq_compute(step, part))

  def dq_store(step, part, dq):
    """dQ_part of `step`'s query rows reduce-added into dq_ref, through
    this consumer's dQ buffers in turn (d64: it computes every other
    step's, so the step's parity would always pick the same buffer)."""
    h, q_rows = _step_rows(step, kv_h, group, lo, per_head, bq)
    dst = dq_ref.at[b, q_rows, h, pl.ds(part * DQ_COLS, DQ_COLS)]
    buf = lax.rem(step if part_per_consumer else lax.div(step, 2), 2)
    _add_to_gmem(dq, dst, dq_smem.at[wg, buf],
                 None if dq_bar is None else dq_bar.at[wg], interpret)

  def skip_dq(step):
    """d64, not this consumer's turn: it frees the buffer at once (ds_free
    wants both)."""
    plgpu.barrier_arrive(ds_free.at[lax.rem(step, 2)])

  def dq_turn(step):
    """d64: the consumer whose turn it is computes the one part."""
    mine = computes_dq(step)
    pl.when(mine)(functools.partial(dq_of, step, 0))
    pl.when(jnp.logical_not(mine))(functools.partial(skip_dq, step))

  def dq_late(step, dq_prev):
    """late_dq_store: this step's dQ part, or at d64 on the other's turn
    the one carried (stored already)."""
    if part_per_consumer:
      return dq_compute(step, wg)

    def keep():
      skip_dq(step)
      return dq_prev
    return lax.cond(computes_dq(step), functools.partial(dq_compute, step, 0),
                    keep)

  def scores(masked, i, slot, s_t):
    """P^T from raw S^T, masked on the diagonal."""
    if masked:
      visible = fm.cols_from(rows - causal_offset - i * bq, st_shape,
                             at_most=False)
      s_t = jnp.where(visible, s_t, fm.NEG_INF)
    plgpu.barrier_wait(lse_ready.at[slot])
    # lse2 = +inf for rows that saw no key: P = 0 there.
    lse2 = lax.broadcast_in_dim(_row_stats(lse2_smem.at[slot], 0), st_shape,
                                (1,))
    return jnp.exp2(s_t * scale - lse2)

  def grad_scores(slot, p_t, dp_t):
    plgpu.barrier_wait(delta_ready.at[slot])
    delta = lax.broadcast_in_dim(_row_stats(delta_smem.at[slot], 0),
                                 st_shape, (1,))
    return (p_t * (dp_t - delta)).astype(dtype)

  def body(masked, g, i, carry):
    """S^T and dP^T issued back to back; P^T computed while dP^T runs, dS^T
    while dV += P^T dO runs; dK and dV accumulate in place (seeded wgmma
    accumulators, so no second register tile). Fused: the dQ part right
    behind dK; late_dq_store: the last step's stored behind S^T and dP^T."""
    dk, dv, *dq_last = carry
    step = g * per_head + i - lo
    slot = lax.rem(base + step, stages)
    with jax.named_scope('wait_q'):
      plgpu.barrier_wait(q_ready.at[slot])
      plgpu.barrier_wait(do_ready.at[slot])

    def scope(s_ref, dp_ref, dv_ref, dk_ref):
      with jax.named_scope('issue_s_dp'):
        plgpu.wgmma(s_ref, k_smem, q_smem.at[slot].T)
        plgpu.wgmma(dp_ref, v_smem, do_smem.at[slot].T)
      if config.stagger:
        pl.when((step == 0) & (wg == 0))(functools.partial(fm.meet_at, turn))
      if prefetch is not None:
        pl.when(step == 0)(prefetch)
      if late:
        with jax.named_scope('dq_store'):
          pl.when((step > 0) & computes_dq(step - 1))(functools.partial(
              dq_store, step - 1, my_part, *dq_last))
      with jax.named_scope('wait_s'):
        s_t = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
      with jax.named_scope('p'):
        p_t = scores(masked, i, slot, s_t)
        p16_t = p_t.astype(dtype)
      with jax.named_scope('issue_dv'):
        fm.seed_acc(dv_ref, dv, interpret)
        plgpu.wgmma(dv_ref, fm.stage_lhs(p16_t, stage), do_smem.at[slot])
      with jax.named_scope('wait_dp'):
        dp_t = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)
      # With dQ in the step, dS from the bf16 P: the float32 P then dies
      # before dS is built (without this, ptxas spilled at d128).
      with jax.named_scope('ds'):
        ds_t = grad_scores(slot, p16_t.astype(jnp.float32)
                           if part_per_consumer else p_t, dp_t)
      if config.fused:
        with jax.named_scope('share_ds'):
          share_ds(step, ds_t)
      with jax.named_scope('issue_dk'):
        fm.seed_acc(dk_ref, dk, interpret)
        plgpu.wgmma(dk_ref, fm.stage_lhs(ds_t, stage), q_smem.at[slot])
      dq = ()
      if config.fused:
        with jax.named_scope('dq'):
          if late:
            dq = (dq_late(step, *dq_last),)
          elif part_per_consumer:
            dq_of(step, wg)
          else:
            dq_turn(step)
      with jax.named_scope('wait_dk_dv'):
        return (fm.read_acc(dk_ref, dk, interpret),
                fm.read_acc(dv_ref, dv, interpret), *dq)

    o_shape = (fm.ROWS_WG, head_dim)
    carry = pl.run_scoped(
        scope, plgpu.ACC(st_shape, jnp.float32),
        plgpu.ACC(st_shape, jnp.float32), plgpu.ACC(o_shape, jnp.float32),
        plgpu.ACC(o_shape, jnp.float32))
    plgpu.barrier_arrive(free.at[slot])
    return carry

  def head(g, carry):
    if causal_offset is not None:
      carry = lax.fori_loop(lo, first_full,
                            functools.partial(body, True, g), carry)
    return lax.fori_loop(first_full, num_q,
                         functools.partial(body, False, g), carry)

  if config.fused:  # both dS buffers start free
    for buf in range(2):
      plgpu.barrier_arrive(ds_free.at[buf])
  if config.stagger:  # every dK/dV CTA has a step: its last key sees a query
    pl.when(wg == 1)(functools.partial(fm.meet_at, turn))
  zeros = fm.wgmma_full((fm.ROWS_WG, head_dim), 0.0)
  carry = (zeros, zeros)
  if late:  # every dK/dV CTA has a step, so a dQ_j to store at the end
    carry += (fm.wgmma_full((bq, DQ_COLS), 0.0),)
  dk, dv, *dq_last = lax.fori_loop(0, group, head, carry)
  if late:
    last = group * per_head - 1
    pl.when(computes_dq(last))(functools.partial(dq_store, last, my_part,
                                                 *dq_last))
  if config.fused:
    for buf in range(2):  # observe the last frees too
      plgpu.barrier_wait(ds_free.at[buf])
  k_smem[...] = (dk * sm_scale).astype(dtype)
  v_smem[...] = dv.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[src])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[src])
  return base + group * per_head


def _step_rows(step, kv_h, group, lo, per_head, block_q):
  """(q head, query rows) of a dK/dV CTA's step: per_head query blocks from
  block lo of each of its kv head's `group` q heads in turn."""
  h = kv_h * group + lax.div(step, per_head)
  return h, pl.ds((lo + lax.rem(step, per_head)) * block_q, block_q)


def _q_range(k_start, block_q, seq_q, causal_offset):
  """(lo, first_full, num_q): query blocks [lo, num_q) see some key of the
  CTA's BLOCK_K keys from k_start (blocks above the causal diagonal are
  skipped); [first_full, num_q) see all of them, unmasked."""
  num_q = seq_q // block_q
  if causal_offset is None:
    return 0, 0, num_q
  lo = jnp.clip(lax.div(jnp.maximum(k_start - causal_offset, 0), block_q), 0,
                num_q)
  last_k = k_start + BLOCK_K - 1 - causal_offset
  first_full = jnp.clip(
      lax.div(jnp.maximum(last_k, 0) + block_q - 1, block_q), lo, num_q)
  return lo, first_full, num_q


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, scale_ref,
                 *refs, causal, group, config, interpret):
  # balance: the tile table's two inputs; fused: a float32 dQ input that the
  # kernel adds into. Then the outputs.
  table, refs = (refs[:2], refs[2:]) if config.balance else (None, refs)
  dq_ref = refs[0] if config.fused else None
  dk_ref, dv_ref, *scratch = refs[1:] if config.fused else refs
  smem, bars = scratch[:9], scratch[9:]
  batch, seq_kv, kv_heads, _ = k_ref.shape
  seq_q = q_ref.shape[1]
  causal_offset = seq_kv - seq_q if causal else None
  grid = (kv_heads, seq_kv // BLOCK_K, batch)
  index, count = _tiles(grid, config.persistent, table)

  def tile(n):  # what the consumers and the producer agree on
    kv_h, k_block, b = index(n)
    k_start = k_block * BLOCK_K
    return kv_h, b, k_start, _q_range(k_start, config.block_q, seq_q,
                                      causal_offset)

  wg = lax.axis_index('wg')

  @pl.when(wg < fm.NUM_CONSUMERS)
  def _():
    plgpu.set_max_registers(CONSUMER_REGS, action='increase')
    _consumer(_dkdv_tile, (k_ref, v_ref),
              (q_ref, k_ref, v_ref, dk_ref, dv_ref, dq_ref), smem, bars,
              wg=wg, count=count, tile=tile, group=group,
              sm_scale=scale_ref[0], causal_offset=causal_offset,
              config=config, interpret=interpret)

  @pl.when(wg == fm.NUM_CONSUMERS)
  def _():
    plgpu.set_max_registers(fm.PRODUCER_REGS, action='decrease')
    _, _, q_smem, do_smem, lse2_smem, delta_smem, *_ = smem
    _, _, q_ready, do_ready, lse_ready, delta_ready, free, *_ = bars
    bq, stages = config.block_q, config.num_stages

    def produce_tile(n, base):
      kv_h, b, _, (lo, _, num_q) = tile(n)
      per_head = num_q - lo

      def rows(step):
        h, q_rows = _step_rows(step, kv_h, group, lo, per_head, bq)
        return b, q_rows, h

      def vec(step):
        h, q_rows = _step_rows(step, kv_h, group, lo, per_head, bq)
        return b, h, q_rows

      loads = [(fm.tma_loader(q_ref, q_smem, rows), q_ready),
               (fm.tma_loader(lse2_ref, lse2_smem, vec), lse_ready),
               (fm.tma_loader(do_ref, do_smem, rows), do_ready),
               (fm.tma_loader(delta_ref, delta_smem, vec), delta_ready)]
      fm.produce([(free, loads)], group * per_head, stages, base=base,
                 drain=False)
      return base + group * per_head

    fm.drain_frees([free], fm.over_tiles(count, produce_tile), stages)


GRID_NAMES = ('x', 'y', 'z')


def _tiles(grid, persistent, table=None):
  """(index, count): index(n) is the grid index of a CTA's n-th tile, of
  `count`. Persistent: tiles in launch order (the first dim fastest), cta,
  cta + ctas, ..., or with a table (order and count refs, balance) those
  of order[cta, :count[cta]]. Otherwise its own tile (count the int 1)."""
  if not persistent:
    return lambda n: tuple(map(lax.axis_index, GRID_NAMES)), 1
  cta, ctas = lax.axis_index('cta'), lax.axis_size('cta')
  if table is None:
    tile = lambda n: cta + n * ctas
    count = lax.div(math.prod(grid) - cta + ctas - 1, ctas)
  else:
    order_ref, count_ref = table
    tile = lambda n: order_ref[cta, n]
    count = count_ref[cta]

  def index(n):
    i, out = tile(n), []
    for size in grid[:-1]:
      out.append(lax.rem(i, size))
      i = lax.div(i, size)
    return (*out, i)
  return index, count


def _launch_grid(grid, persistent, interpret):
  """plgpu.kernel's grid and grid_names: one CTA per SM when persistent."""
  if persistent:
    return dict(grid=(_ctas(grid, interpret),), grid_names=('cta',))
  return dict(grid=grid, grid_names=GRID_NAMES)


def _ctas(grid, interpret):
  return min(math.prod(grid), fm.persistent_ctas(interpret))


def _balanced_table(grid, interpret, steps):
  """balance: the kernel's (order, count) inputs, from steps(*grid index)
  over all tiles in launch order (the first grid dim fastest)."""
  with jax.ensure_compile_time_eval():
    index = np.unravel_index(np.arange(math.prod(grid)), grid, order='F')
    tile_steps = np.broadcast_to(np.asarray(steps(*index)), index[0].shape)
  return fm.list_schedule(tile_steps, _ctas(grid, interpret))


def _dq_block(i, num_q, causal):
  """The query block of the dQ kernel's grid index i: causal, the longest
  rows first."""
  return num_q - 1 - i if causal else i


def _dq_tile(refs, smem, bars, *, wg, buf, base, src, tile, prefetch,
             sm_scale, causal_offset, config, interpret):
  """One tile's key steps, from Q/dO buffer buf, step j on K/V slot
  (base + j) % stages; prefetch() (persistent) runs once step 0's wgmmas are
  in flight, or at once for rows that see no key. Returns base plus the
  tile's steps."""
  q_ref, _, lse2_ref, delta_ref, dq_ref = refs
  q_own, do_own, k_smem, v_smem, stage = smem
  _, _, k_ready, v_ready, k_free, v_free, turn = bars
  h, b, q_start, steps = tile
  block_k, num_stages = config.block_k, config.num_stages
  head_dim, dtype = q_ref.shape[-1], q_ref.dtype
  scale = sm_scale * fm.LOG2E
  rows = q_start + wg * fm.ROWS_WG
  q_smem, do_smem = q_own.at[buf, wg], do_own.at[buf, wg]
  stage = None if stage is None else stage.at[wg]
  s_shape = (fm.ROWS_WG, block_k)
  vec = (b, h, pl.ds(rows, fm.ROWS_WG))
  # lse2 = +inf for rows that saw no key: P = 0 there.
  lse2 = fm.rows_col(_row_stats(lse2_ref.at[vec], 1, gmem=True), s_shape)
  delta = fm.rows_col(_row_stats(delta_ref.at[vec], 1, gmem=True), s_shape)

  def probs(masked, j, s):
    if masked:
      visible = fm.cols_from(rows + causal_offset - j * block_k, s_shape)
      s = jnp.where(visible, s, fm.NEG_INF)
    return jnp.exp2(s * scale - lse2)

  def body(masked, j, dq):
    """S and dP issued back to back, P computed while dP runs; dQ
    accumulates in place."""
    slot = lax.rem(base + j, num_stages)
    with jax.named_scope('wait_kv'):
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])

    def scope(s_ref, dp_ref, acc_ref):
      with jax.named_scope('issue_s_dp'):
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
        plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].T)
      if config.stagger:
        pl.when((j == 0) & (wg == 0))(functools.partial(fm.meet_at, turn))
      if prefetch is not None:
        pl.when(j == 0)(prefetch)
      with jax.named_scope('wait_s'):
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
      with jax.named_scope('p'):
        p = probs(masked, j, s)
      with jax.named_scope('wait_dp'):
        dp = plgpu.wgmma_accumulator_load(dp_ref)
      plgpu.barrier_arrive(v_free.at[slot])
      fm.seed_acc(acc_ref, dq, interpret)
      with jax.named_scope('ds'):
        ds = (p * (dp - delta)).astype(dtype)
      with jax.named_scope('issue_dq'):
        plgpu.wgmma(acc_ref, fm.stage_lhs(ds, stage), k_smem.at[slot])
      with jax.named_scope('wait_dq'):
        return fm.read_acc(acc_ref, dq, interpret)

    dq = pl.run_scoped(scope, plgpu.ACC(s_shape, jnp.float32),
                       plgpu.ACC(s_shape, jnp.float32),
                       plgpu.ACC((fm.ROWS_WG, head_dim), jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])
    return dq

  unmasked, total = steps
  if config.stagger:  # rows that see no key issue nothing: no meeting
    pl.when((wg == 1) & (total > 0))(functools.partial(fm.meet_at, turn))
  dq = fm.wgmma_full((fm.ROWS_WG, head_dim), 0.0)
  dq = lax.fori_loop(0, unmasked, functools.partial(body, False), dq)
  if causal_offset is not None:
    dq = lax.fori_loop(unmasked, total, functools.partial(body, True), dq)
  if prefetch is not None:
    pl.when(total == 0)(prefetch)
  q_smem[...] = (dq * sm_scale).astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[src])
  return base + total


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, scale_ref,
               *refs, causal, group, config, interpret):
  # balance: the tile table's two inputs, then the output.
  table, refs = (refs[:2], refs[2:]) if config.balance else (None, refs)
  dq_ref, *scratch = refs
  smem, bars = scratch[:5], scratch[5:]
  batch, seq_q, heads, _ = q_ref.shape
  seq_kv = k_ref.shape[1]
  block_k, stages = config.block_k, config.num_stages
  causal_offset = seq_kv - seq_q if causal else None
  grid = (heads, seq_q // fm.BLOCK_Q, batch)
  index, count = _tiles(grid, config.persistent, table)

  def tile(n):  # what the consumers and the producer agree on
    h, i, b = index(n)
    q_start = _dq_block(i, grid[1], causal) * fm.BLOCK_Q
    return h, b, q_start, fm.kv_steps(q_start, fm.BLOCK_Q, block_k, seq_kv,
                                      causal_offset)

  wg = lax.axis_index('wg')

  @pl.when(wg < fm.NUM_CONSUMERS)
  def _():
    plgpu.set_max_registers(CONSUMER_REGS, action='increase')
    _consumer(_dq_tile, (q_ref, do_ref),
              (q_ref, do_ref, lse2_ref, delta_ref, dq_ref), smem, bars,
              wg=wg, count=count, tile=tile, sm_scale=scale_ref[0],
              causal_offset=causal_offset, config=config,
              interpret=interpret)

  @pl.when(wg == fm.NUM_CONSUMERS)
  def _():
    plgpu.set_max_registers(fm.PRODUCER_REGS, action='decrease')
    _, _, k_smem, v_smem, _ = smem
    _, _, k_ready, v_ready, k_free, v_free, _ = bars

    def produce_tile(n, base):
      h, b, _, (_, total) = tile(n)
      kv_h = lax.div(h, group)
      rows = lambda step: (b, pl.ds(step * block_k, block_k), kv_h)
      fm.produce(
          [(k_free, [(fm.tma_loader(k_ref, k_smem, rows), k_ready)]),
           (v_free, [(fm.tma_loader(v_ref, v_smem, rows), v_ready)])],
          total, stages, base=base, drain=False)
      return base + total

    fm.drain_frees([k_free, v_free], fm.over_tiles(count, produce_tile),
                   stages)


def flash_bwd(q, k, v, o, lse, do, dlse, *, sm_scale, causal, interpret,
              config=None):
  """(dq, dk, dv) from o and lse (the forward's, or global ones for ring
  attention); dlse, if not None, is the cotangent of lse. Inputs validated and
  fm.unsupported() is None."""
  config = config or MosaicBwdConfig.default(q.shape[3], causal)
  if config.fused and q.shape[3] not in FUSED_HEAD_DIMS:
    raise ValueError(f'fused backward needs head_dim in {FUSED_HEAD_DIMS}, '
                     f'got {q.shape[3]}')
  return _flash_bwd(q, k, v, o, lse, do, dlse, fm.scale_input(sm_scale),
                    causal=causal, interpret=interpret, config=config)


# jit: layers that differ only in sm_scale trace and lower the kernels once.
@functools.partial(jax.jit, static_argnames=('causal', 'interpret', 'config'))
def _flash_bwd(q, k, v, o, lse, do, dlse, scale, *, causal, interpret,
               config):
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  bq, bk, stages = config.block_q, config.block_k, config.num_stages
  dtype = q.dtype
  # dS = P * (dP - delta) + dlse * P: the lse cotangent folds into delta.
  delta = jnp.einsum('bqhd,bqhd->bhq', o.astype(jnp.float32),
                     do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * fm.LOG2E)
  interpret = fm.interpret_params(interpret)
  wg_tile = (fm.NUM_CONSUMERS, fm.ROWS_WG, head_dim)
  kwargs = dict(causal=causal, group=group, config=config)
  mesh = dict(num_threads=fm.NUM_CONSUMERS + 1, thread_name='wg',
              compiler_params=fm.COMPILER_PARAMS,
              interpret=interpret)
  per_wg = plgpu.Barrier(num_barriers=fm.NUM_CONSUMERS)
  per_stage = plgpu.Barrier(num_barriers=stages)
  freed = plgpu.Barrier(num_arrivals=fm.NUM_CONSUMERS, num_barriers=stages)
  meeting = (plgpu.Barrier(num_arrivals=fm.NUM_CONSUMERS) if config.stagger
             else None)

  def staging(cols):
    # The interpreter's wgmma reads A only from smem; on the GPU, P and dS
    # go from registers.
    return (fm.smem((fm.NUM_CONSUMERS, fm.ROWS_WG, cols), dtype)
            if interpret else None)

  fused = config.fused
  # Fused: dQ accumulates in float32 in place (a mutable ref: the kernel's
  # reduce-adds land in this zeroed buffer).
  dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32)) if fused else None
  # A consumer's own tiles, loaded once a tile (dK/dV: K and V, then dK and
  # dV; dQ: Q then dQ, and dO); persistent, of a CTA's even and odd tiles.
  buffers = 2 if config.persistent else 1
  own_tile = fm.smem((buffers, *wg_tile), dtype)
  own_bars = plgpu.Barrier(num_barriers=buffers * fm.NUM_CONSUMERS)
  # At d128 the dQ kernel's K/V stages leave room for one Q/dO buffer only.
  dq_buffers = buffers if head_dim <= 96 else 1
  dq_own_tile = fm.smem((dq_buffers, *wg_tile), dtype)
  dq_own_bars = plgpu.Barrier(num_barriers=dq_buffers * fm.NUM_CONSUMERS)
  causal_offset = seq_kv - seq_q if causal else None
  dkdv_grid = (kv_heads, seq_kv // BLOCK_K, batch)
  dq_grid = (heads, seq_q // fm.BLOCK_Q, batch)
  if config.balance:
    def dkdv_steps(kv_h, k_block, b):
      del kv_h, b
      lo, _, num_q = _q_range(k_block * BLOCK_K, bq, seq_q, causal_offset)
      return group * (num_q - lo)

    def dq_steps(h, i, b):
      del h, b
      q_start = _dq_block(i, dq_grid[1], causal) * fm.BLOCK_Q
      return fm.kv_steps(q_start, fm.BLOCK_Q, bk, seq_kv, causal_offset)[1]

    dkdv_table = _balanced_table(dkdv_grid, interpret, dkdv_steps)
    dq_table = _balanced_table(dq_grid, interpret, dq_steps)
  else:
    dkdv_table = dq_table = ()
  dk, dv = plgpu.kernel(
      functools.partial(_dkdv_kernel, interpret=interpret is not None,
                        **kwargs),
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype),
                jax.ShapeDtypeStruct(v.shape, dtype)),
      scratch_types=[
          own_tile, own_tile,  # K, V; dK, dV
          fm.smem((stages, bq, head_dim), dtype),  # Q
          fm.smem((stages, bq, head_dim), dtype),  # dO
          plgpu.SMEM((stages, bq), jnp.float32),  # lse2
          plgpu.SMEM((stages, bq), jnp.float32),  # delta
          staging(bq),
          # Fused: dS^T of both consumers, two turns; each one's dQ tile.
          fm.smem((2, fm.NUM_CONSUMERS, fm.ROWS_WG, bq), dtype)
          if fused else None,
          # Fused: each consumer's dQ parts, two buffers (a reduce-add in
          # flight reads one while the next part is written to the other).
          fm.smem((fm.NUM_CONSUMERS, 2, bq, DQ_COLS), jnp.float32)
          if fused else None,
          own_bars, own_bars, per_stage, per_stage, per_stage, per_stage,
          freed, plgpu.Barrier(num_arrivals=fm.NUM_CONSUMERS, num_barriers=2),
          # ds_free: both consumers done with the buffer.
          plgpu.Barrier(num_arrivals=fm.NUM_CONSUMERS, num_barriers=2),
          per_wg if fused and interpret else None,
          meeting],
      **_launch_grid(dkdv_grid, config.persistent, interpret),
      **mesh,
  )(q, k, v, do, lse2, delta, scale, *dkdv_table,
    *([dq_acc] if fused else []))
  if fused:
    return (jax.freeze(dq_acc) * scale[0]).astype(dtype), dk, dv

  dq = plgpu.kernel(
      functools.partial(_dq_kernel, interpret=interpret is not None,
                        **kwargs),
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[
          dq_own_tile, dq_own_tile,  # Q then dQ, dO
          fm.smem((stages, bk, head_dim), dtype),  # K
          fm.smem((stages, bk, head_dim), dtype),  # V
          staging(bk),
          dq_own_bars, dq_own_bars, per_stage, per_stage, freed, freed,
          meeting],
      **_launch_grid(dq_grid, config.persistent, interpret),
      **mesh,
  )(q, k, v, do, lse2, delta, scale, *dq_table)
  return dq, dk, dv
