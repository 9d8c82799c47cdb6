"""Attention benchmark on one GPU: our FlashAttention-2 kernels (Triton:
'flash'; Hopper Mosaic GPU: 'mosaic') against cuDNN and XLA
(jax.nn.dot_product_attention) and JAX's shipped Pallas op.

The FlashAttention-2 paper's setting (batch x seq = 16k tokens, hidden 2048 as
16 heads x 128 or 32 x 64, seq 512 .. 16k, causal and not) plus the seed
model's shape (batch 4, seq 1024, 32 heads x 80). bf16, random inputs. Our
kernels are checked against the float32 reference (one batch row, two heads)
at each shape before timing. TFLOP/s as FA2 counts: forward 4*b*s^2*h*d, halved
when causal; forward+backward 3.5x that.

  python benchmarks/attention.py --quick            # a few shapes, all impls
  python benchmarks/attention.py --shapes s8192_d128,s1024_d80 --impls flash
  python benchmarks/attention.py --quick --impls mosaic,cudnn,flash
  python benchmarks/attention.py --impls mosaic,cudnn --rounds 3
                                                    # impls timed in turn
  python benchmarks/attention.py --sweep            # our kernel's variants
  python benchmarks/attention.py --sweep_mosaic     # the Mosaic kernels' knobs
                                                    # (and ptxas's spills)
  python benchmarks/attention.py --sweep_mosaic --shapes b1_s16384_h24_d96 \
      --variants 'fwd k128 s2 overlap,fwd k128 s2 pingpong persistent' \
      --rounds 3                                    # an A/B, rounds in turn
Writes <out>/attention_<gpu>.json (default runs/benchmarks/; result_files.py).
"""
import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from kernels.flash_attention import (BlockSizes, MosaicTuning,
                                     flash_attention, flash_attention_bwd,
                                     flash_attention_fwd)
from kernels.flash_mosaic import MosaicConfig
from kernels.flash_mosaic_vjp import FUSED_HEAD_DIMS, MosaicBwdConfig
from kernels.reference import reference_attention
import ptxas_report
import result_files
# pylint: enable=g-import-not-at-top

warnings.filterwarnings('ignore', category=DeprecationWarning)

TOKENS = 16 * 1024
IMPLS = ('flash', 'mosaic', 'cudnn', 'xla', 'pallas_mha')
# Not in the default run: the Mosaic kernel on q, k, v zero-padded in HBM to
# head_dim 96 or 128 (issue 9's question for d80: padding against the native
# layout); the pad and slice copies are timed with it.
PADDED = ('mosaic_pad96', 'mosaic_pad128')
# Checked against the reference before timing.
OURS = ('flash', 'mosaic') + PADDED


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  seq: int
  heads: int
  head_dim: int

  @property
  def name(self):
    if self in SHAPES:
      return f's{self.seq}_d{self.head_dim}'
    return f'b{self.batch}_s{self.seq}_h{self.heads}_d{self.head_dim}'


SHAPES = [Shape(TOKENS // s, s, 2048 // d, d)
          for d in (128, 64) for s in (512, 1024, 2048, 4096, 8192, 16384)]
SHAPES.append(Shape(4, 1024, 32, 80))  # the seed model (GPT-3 2.7B)
CUSTOM_SHAPE = re.compile(r'b(\d+)_s(\d+)_h(\d+)_d(\d+)')
QUICK = ('s2048_d128', 's8192_d128', 's2048_d64', 's1024_d80')
# --sweep_mosaic: one long and one short shape per head_dim, most telling first.
SWEEP_MOSAIC = ('s8192_d128', 's1024_d80', 's2048_d64', 's2048_d128')


def shape_named(name):
  """One of SHAPES by name (s8192_d128), or any shape as b4_s1024_h32_d80."""
  for shape in SHAPES:
    if shape.name == name:
      return shape
  if match := CUSTOM_SHAPE.fullmatch(name):
    return Shape(*map(int, match.groups()))
  raise ValueError(f'unknown shape {name!r}: one of '
                   f'{", ".join(s.name for s in SHAPES)}, or b<batch>_s<seq>_'
                   'h<heads>_d<head_dim>')


def fwd_flops(shape, causal):
  flops = 4 * shape.batch * shape.seq**2 * shape.heads * shape.head_dim
  return flops / 2 if causal else flops


def attention_fn(impl, causal, block_sizes=None):
  """block_sizes: BlockSizes for 'flash', MosaicTuning for 'mosaic'."""
  if impl == 'flash':
    return lambda q, k, v: flash_attention(q, k, v, causal=causal,
                                           block_sizes=block_sizes)
  if impl == 'mosaic':
    return lambda q, k, v: flash_attention(q, k, v, causal=causal,
                                           backend='mosaic',
                                           mosaic_config=block_sizes)
  if impl in PADDED:
    width = int(impl.removeprefix('mosaic_pad'))

    def padded(q, k, v):
      head_dim = q.shape[-1]
      if head_dim > width:
        raise ValueError(f'{impl}: head_dim {head_dim} > {width}')
      pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - head_dim)])
      o = flash_attention(pad(q), pad(k), pad(v), causal=causal,
                          sm_scale=head_dim**-0.5, backend='mosaic')
      return o[..., :head_dim]
    return padded
  if impl in ('cudnn', 'xla'):
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl)
  if impl == 'pallas_mha':
    # Imported here: the module warns on import, and only peers need it.
    from jax.experimental.pallas.ops.gpu import attention as mha_op  # pylint: disable=g-import-not-at-top
    return lambda q, k, v: mha_op.mha(
        q, k, v, None, sm_scale=q.shape[-1]**-0.5, causal=causal)
  raise ValueError(f'unknown impl {impl}')


def fwd_bwd(attention):
  def run(q, k, v, do):
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp(do)
  return run


def inputs(shape, key, dtype=jnp.bfloat16):
  keys = jax.random.split(key, 4)
  dims = (shape.batch, shape.seq, shape.heads, shape.head_dim)
  return [jax.random.normal(k, dims, dtype) for k in keys]


def time_ms(fn, args, min_time=0.25, reps=5):
  """Median ms per call; calls are queued back to back, then synchronized."""
  jax.block_until_ready(fn(*args))  # compile, warm up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  iters = max(2, min(200, int(min_time / reps / max(once, 1e-6))))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return 1e3 * statistics.median(times)


def rel_err(got, want):
  got, want = got.astype(jnp.float32), want.astype(jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def _check_inputs(shape):
  return [x[:1, :, :2] for x in inputs(shape, jax.random.PRNGKey(1))]


def reference_outputs(shape, causal):
  """The f32 reference's (out, (dq, dk, dv)) on check()'s inputs."""
  ref = lambda q, k, v: reference_attention(q, k, v, causal=causal)
  return jax.jit(lambda *a: (ref(*a[:3]), fwd_bwd(ref)(*a)))(
      *_check_inputs(shape))


def check(shape, causal, impl='flash', block_sizes=None, want=None):
  """One of our kernels' max relative error (out, dq, dk, dv) vs the f32
  reference (want: reference_outputs, if already computed), on one batch row
  and two heads at the full sequence length."""
  ours = attention_fn(impl, causal, block_sizes)
  got = jax.jit(lambda *a: (ours(*a[:3]), fwd_bwd(ours)(*a)))(
      *_check_inputs(shape))
  if want is None:
    want = reference_outputs(shape, causal)
  return max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got),
                                            jax.tree.leaves(want)))


def more_rounds(timed, rounds):
  """Rounds 2 to `rounds` of `timed`, a list of groups (an impl's or
  variant's calls), each a list of (ms_rounds, fn, args): every call timed
  once a round, the groups in turn, each time appended to its ms_rounds.
  Every other round takes the groups backwards, so none is always timed
  last (in fixed order the last-timed one's third round often ran
  slowest)."""
  for r in range(1, rounds):
    for group in (timed[::-1] if r % 2 else timed):
      for ms_rounds, fn, args in group:
        ms_rounds.append(time_ms(fn, args))


def timed_calls(impl, shape, causal, block_sizes=None):
  """{'fwd': (fn, args), 'fwdbwd': (fn, args)} of one impl, for time_ms."""
  q, k, v, do = inputs(shape, jax.random.PRNGKey(0))
  attention = attention_fn(impl, causal, block_sizes)
  return dict(fwd=(jax.jit(attention), (q, k, v)),
              fwdbwd=(jax.jit(fwd_bwd(attention)), (q, k, v, do)))


def with_tflops(record, shape, causal):
  """record's fwd_ms and fwdbwd_ms, and TFLOP/s from them."""
  flops = fwd_flops(shape, causal)
  return dict(record, tflops_fwd=flops / record['fwd_ms'] / 1e9,
              tflops_fwdbwd=3.5 * flops / record['fwdbwd_ms'] / 1e9)


def bench_impl(impl, shape, causal, block_sizes=None):
  calls = timed_calls(impl, shape, causal, block_sizes)
  return with_tflops({f'{part}_ms': time_ms(*call)
                      for part, call in calls.items()}, shape, causal)


def sweep_variants(shape, causal):
  """(part, BlockSizes): forward tiles, then dK/dV and dQ tiles one at a time
  around the defaults."""
  head_dim = shape.head_dim
  base = BlockSizes.default(head_dim, shape.seq, causal)
  fwd = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
         (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3)]
  dkdv = [(64, 128, 8, 2), (32, 128, 4, 2), (32, 128, 8, 3), (64, 128, 4, 2),
          (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2), (16, 128, 4, 3)]
  dq = [(128, 64, 8, 2), (128, 32, 4, 2), (128, 32, 8, 3), (128, 64, 4, 2),
        (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2), (128, 16, 4, 3)]
  if head_dim > 128:
    fwd = [(64, 32, 4, 2), (64, 64, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2),
           (32, 64, 4, 2), (64, 64, 8, 1)]
    dkdv = [(32, 64, 8, 1), (32, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)]
    dq = [(64, 32, 8, 1), (64, 32, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2)]
  out = []
  for bq, bk, w, st in fwd:
    out.append(('fwd', dataclasses.replace(
        base, block_q=bq, block_k=bk, num_warps=w, num_stages=st)))
  for bq, bk, w, st in dkdv:
    out.append(('bwd', dataclasses.replace(
        base, block_q_dkv=bq, block_k_dkv=bk, num_warps_dkv=w,
        num_stages_dkv=st)))
  for bq, bk, w, st in dq:
    out.append(('bwd', dataclasses.replace(
        base, block_q_dq=bq, block_k_dq=bk, num_warps_dq=w,
        num_stages_dq=st)))
  return out


def describe(part, bs):
  if part == 'fwd':
    return f'fwd q{bs.block_q} k{bs.block_k} w{bs.num_warps} s{bs.num_stages}'
  return (f'dkdv q{bs.block_q_dkv} k{bs.block_k_dkv} w{bs.num_warps_dkv} '
          f's{bs.num_stages_dkv} | dq q{bs.block_q_dq} k{bs.block_k_dq} '
          f'w{bs.num_warps_dq} s{bs.num_stages_dq}')


def sweep(shape, causal):
  """Times each variant's forward or backward alone."""
  q, k, v, do = inputs(shape, jax.random.PRNGKey(0))
  flops = fwd_flops(shape, causal)
  o, lse = flash_attention_fwd(q, k, v, causal=causal)
  records = []
  for part, bs in sweep_variants(shape, causal):
    try:
      if part == 'fwd':
        fn = jax.jit(lambda q, k, v, bs=bs: flash_attention_fwd(
            q, k, v, causal=causal, block_sizes=bs))
        ms = time_ms(fn, (q, k, v))
        tflops = flops / ms / 1e9
      else:
        fn = jax.jit(lambda *a, bs=bs: flash_attention_bwd(
            *a, causal=causal, block_sizes=bs))
        ms = time_ms(fn, (q, k, v, o, lse, do))
        tflops = 2.5 * flops / ms / 1e9
    except Exception as e:  # pylint: disable=broad-except
      ms, tflops = float('nan'), float('nan')
      print(f'  {describe(part, bs)}: failed: {str(e)[:200]}')
    records.append(dict(shape=shape.name, causal=causal, part=part,
                        variant=describe(part, bs), ms=ms, tflops=tflops))
    print(f'  {shape.name} causal={causal:d} {describe(part, bs):60s} '
          f'{ms:8.3f} ms {tflops:6.1f} TFLOP/s', flush=True)
  return records


def mosaic_variants(head_dim):
  """(part, MosaicTuning): the forward's FA3 scheduling knobs and key blocks,
  then the backward's (fused or block sizes), each around the defaults."""
  base = MosaicConfig(128, 3 if head_dim <= 64 else 2)
  fwd = [base, dataclasses.replace(base, pingpong=True),
         dataclasses.replace(base, overlap=True),
         dataclasses.replace(base, pingpong=True, overlap=True),
         dataclasses.replace(base, overlap=True, persistent=True),
         dataclasses.replace(base, pingpong=True, persistent=True)]
  # d64: a 256-key block fits (S is 128 registers a thread): no overlap.
  fwd += ([MosaicConfig(256, 2, pingpong=True),
           MosaicConfig(256, 2, pingpong=True, persistent=True)]
          if head_dim <= 64 else
           # Above d64 a third stage (fits at d128 only without persistence).
           [MosaicConfig(128, 3, overlap=True)])
  # Overlap with the consumers out of phase (every head_dim: the d ≥ 80
  # defaults at long sequences, and against d64's ping-pong).
  fwd += [MosaicConfig(128, 2, overlap=True, stagger=True),
          MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True)]
  # The last tiles cut among all CTAs (without the mask only): at the
  # defaults' persistent schedules.
  fwd += [MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                       split_tail=True),
          MosaicConfig(128, 2, pingpong=True, persistent=True,
                       split_tail=True)]
  if head_dim <= 64:
    fwd.append(MosaicConfig(256, 2, pingpong=True, persistent=True,
                            split_tail=True))
  # Tiles dealt by list scheduling (with the mask only).
  fwd += [MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                       balance=True),
          MosaicConfig(128, 2, pingpong=True, persistent=True, balance=True)]
  if head_dim <= 64:  # and the 256-key block of d64 without the mask
    fwd += [MosaicConfig(128, 3, pingpong=True, persistent=True,
                         balance=True),
            MosaicConfig(256, 2, pingpong=True, persistent=True,
                         balance=True)]
  if head_dim <= 96:  # three consumers' 160 registers: d64, d80/d96 spill
    fwd += [MosaicConfig(128, stages, consumers=3, **schedule)
            for stages in (2, 3)
            for schedule in (dict(), dict(stagger=True),
                             dict(overlap=True, stagger=True),
                             dict(overlap=True, persistent=True,
                                  stagger=True))]
    fwd.append(MosaicConfig(128, 2, overlap=True, persistent=True,
                            stagger=True, consumers=3, balance=True))
    # Each consumer only its own rows' key blocks (with the mask).
    fwd.append(MosaicConfig(128, 2, overlap=True, stagger=True, consumers=3,
                            own_steps=True))
  bwd = [MosaicBwdConfig(), MosaicBwdConfig(block_k=128),
         MosaicBwdConfig(block_k=128, stagger=True),
         MosaicBwdConfig(block_k=128, stagger=True, persistent=True),
         MosaicBwdConfig(block_k=128, stagger=True, persistent=True,
                         balance=True)]
  if head_dim <= 96:  # a third stage of the dQ kernel's K and V fits
    bwd.append(MosaicBwdConfig(block_k=128, num_stages=3))
  if head_dim in FUSED_HEAD_DIMS:
    bwd.append(MosaicBwdConfig(fused=True))
    bwd.append(MosaicBwdConfig(fused=True, late_dq_store=True))
    if head_dim <= 64:  # a third stage fits in smem only below d128
      bwd.append(MosaicBwdConfig(num_stages=3, fused=True))
  return ([('fwd', MosaicTuning(fwd=c)) for c in fwd] +
          [('bwd', MosaicTuning(bwd=c)) for c in bwd])


def describe_mosaic(part, tuning):
  if part == 'fwd':
    c = tuning.fwd
    return (f'fwd k{c.block_k} s{c.num_stages}'
            f'{" pingpong" if c.pingpong else ""}'
            f'{" overlap" if c.overlap else ""}'
            f'{" persistent" if c.persistent else ""}'
            f'{" stagger" if c.stagger else ""}'
            f'{f" c{c.consumers}" if c.consumers != 2 else ""}'
            f'{" split" if c.split_tail else ""}'
            f'{" balance" if c.balance else ""}'
            f'{" own" if c.own_steps else ""}')
  c = tuning.bwd
  return (f'bwd q{c.block_q} k{c.block_k} s{c.num_stages}'
          f'{" fused" if c.fused else ""}{" stagger" if c.stagger else ""}'
          f'{" persistent" if c.persistent else ""}'
          f'{" balance" if c.balance else ""}'
          f'{" late_dq" if c.late_dq_store else ""}')


def applies(part, tuning, causal):
  """Whether a Mosaic variant runs with(out) the mask: the split tail is for
  the forward without it only, balanced tiles for the forward with it."""
  return part != 'fwd' or not (tuning.fwd.split_tail and causal or
                               tuning.fwd.balance and not causal)


def variant_call(part, tuning, causal, q, k, v, o, lse, do):
  """(fn, args): the variant's forward, or its backward alone."""
  kwargs = dict(causal=causal, backend='mosaic', mosaic_config=tuning)
  if part == 'fwd':
    return (lambda q, k, v: flash_attention_fwd(q, k, v, **kwargs)), (q, k, v)
  return ((lambda *a: flash_attention_bwd(*a, **kwargs)),
          (q, k, v, o, lse, do))


def unknown_variants(names, head_dim):
  """An error message if some of `names` are no Mosaic variant of head_dim
  (as describe_mosaic names them), else None."""
  known = [describe_mosaic(*v) for v in mosaic_variants(head_dim)]
  if unknown := [v for v in names or () if v not in known]:
    return f'--variants {unknown} not among d{head_dim}\'s: {known}'
  return None


def sweep_mosaic(shape, causal, parts=('fwd', 'bwd'), names=None, rounds=1):
  """Each Mosaic variant's forward or backward alone (those of `parts`; of
  `names` only, if given), after checking it (forward and backward) against
  the f32 reference; cuDNN's forward and forward+backward for scale. With
  rounds > 1, every variant is timed once a round, in turn (ms: the median
  of the rounds; every other round in reverse order), so that drifts of the
  GPU's clocks hit all alike."""
  q, k, v, do = inputs(shape, jax.random.PRNGKey(0))
  flops = fwd_flops(shape, causal)
  # The default kernels, compiled before any variant's ptxas report is taken.
  o, lse = flash_attention_fwd(q, k, v, causal=causal, backend='mosaic')
  jax.block_until_ready(flash_attention_bwd(q, k, v, o, lse, do,
                                            causal=causal, backend='mosaic'))
  want = reference_outputs(shape, causal)
  records, timed = [], []
  for part, tuning in mosaic_variants(shape.head_dim):
    name = describe_mosaic(part, tuning)
    if part not in parts or (names is not None and name not in names):
      continue
    if not applies(part, tuning, causal):
      continue
    record = dict(shape=shape.name, causal=causal, part=part, variant=name)
    reports = []
    try:
      with ptxas_report.capture() as reports:
        record['rel_err'] = check(shape, causal, 'mosaic', tuning, want)
        fn, args = variant_call(part, tuning, causal, q, k, v, o, lse, do)
        fn = jax.jit(fn)
        record['ms_rounds'] = [time_ms(fn, args)]
      timed.append((record, fn, args))
    except Exception as e:  # pylint: disable=broad-except
      record['error'] = f'{type(e).__name__}: {str(e)[:300]}'
    record['ptxas'] = reports  # the kernels first compiled for this variant
    records.append(record)
  more_rounds([[(record['ms_rounds'], fn, args)]
               for record, fn, args in timed], rounds)
  for record, _, _ in timed:
    ms = statistics.median(record['ms_rounds'])
    work = flops if record['part'] == 'fwd' else 2.5 * flops
    record.update(ms=ms, tflops=work / ms / 1e9)
  for record in records:
    print(json.dumps(record), flush=True)
  ref = dict(shape=shape.name, causal=causal, part='cudnn', variant='cudnn')
  try:
    ref.update(bench_impl('cudnn', shape, causal))
  except Exception as e:  # pylint: disable=broad-except
    ref['error'] = f'{type(e).__name__}: {str(e)[:300]}'
  print(json.dumps(ref), flush=True)
  return records + [ref]


def print_sweep_mosaic(records):
  """Per shape: each variant's ms, TFLOP/s and rel err; the best forward and
  backward, and their sum as forward+backward against cuDNN's."""
  cases = list(dict.fromkeys((r['shape'], r['causal']) for r in records))
  for name, causal in cases:
    rows = [r for r in records if (r['shape'], r['causal']) == (name, causal)]
    print(f'{name}{" causal" if causal else ""}')
    best = {}
    for r in rows:
      if r['part'] == 'cudnn':
        continue
      if 'error' in r:
        print(f'  {r["variant"]:36s} failed: {r["error"][:80]}')
        continue
      spills = [p['spill_stores'] for p in r.get('ptxas', [])]
      print(f'  {r["variant"]:36s} {r["ms"]:8.3f} ms {r["tflops"]:6.1f} '
            f'TFLOP/s  err {r["rel_err"]:.1e}  spill stores (B) '
            f'{spills or "-"}')
      if r['rel_err'] < 1e-2 and (r['part'] not in best or
                                  r['ms'] < best[r['part']]['ms']):
        best[r['part']] = r
    ref = next((r for r in rows if r['part'] == 'cudnn' and 'error' not in r),
               None)
    if 'bwd' in best and ref:  # cuDNN's backward: its fwd+bwd less its fwd
      print(f'  best bwd: {best["bwd"]["variant"]}: '
            f'{(ref["fwdbwd_ms"] - ref["fwd_ms"]) / best["bwd"]["ms"]:.2f}x '
            'cuDNN\'s backward')
    if 'fwd' in best and 'bwd' in best and ref:
      fwdbwd = best['fwd']['ms'] + best['bwd']['ms']
      print(f'  best: {best["fwd"]["variant"]} + {best["bwd"]["variant"]}: '
            f'fwd {ref["fwd_ms"] / best["fwd"]["ms"]:.2f}x cuDNN, fwd+bwd '
            f'{ref["fwdbwd_ms"] / fwdbwd:.2f}x cuDNN ({fwdbwd:.3f} vs '
            f'{ref["fwdbwd_ms"]:.3f} ms)')


def compare(shape, causal, impls, check_ours, rounds=1):
  """Each impl's forward and forward+backward (ours checked first). With
  rounds > 1, every impl is timed once a round, in turn (every other round
  in reverse order), and each time is the median of its rounds: a drift of
  the GPU's clocks then hits all impls alike."""
  records, timed = [], []
  for impl in impls:
    record = dict(impl=impl, b=shape.batch, s=shape.seq, h=shape.heads,
                  d=shape.head_dim, causal=causal, rel_err=None)
    try:
      if check_ours and impl in OURS:
        record['rel_err'] = check(shape, causal, impl)
        print(f'{shape.name} causal={causal:d}: {impl} max rel err '
              f'{record["rel_err"]:.2e}', flush=True)
      calls = timed_calls(impl, shape, causal)
      for part, call in calls.items():
        record[f'{part}_ms_rounds'] = [time_ms(*call)]
      timed.append((record, calls))
    except Exception as e:  # pylint: disable=broad-except
      record['error'] = f'{type(e).__name__}: {str(e)[:300]}'
    records.append(record)
  more_rounds([[(record[f'{part}_ms_rounds'], *call)
                for part, call in calls.items()] for record, calls in timed],
              rounds)
  for record, calls in timed:
    record.update(with_tflops({f'{part}_ms': statistics.median(
        record[f'{part}_ms_rounds']) for part in calls}, shape, causal))
  for record in records:
    print(json.dumps(record), flush=True)
  return records


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', help='comma list of names, e.g. s8192_d128 '
                      'or b4_s1024_h32_d80')
  parser.add_argument('--impls', default=','.join(IMPLS),
                      help=f'comma list of {", ".join(IMPLS + PADDED)}')
  parser.add_argument('--causal', choices=('both', 'yes', 'no'),
                      default='both')
  parser.add_argument('--quick', action='store_true',
                      help=f'only {",".join(QUICK)}')
  parser.add_argument('--sweep', action='store_true',
                      help='time our kernel variants instead of the impls')
  parser.add_argument('--sweep_mosaic', action='store_true',
                      help='time the Mosaic kernels\' knobs (default shapes '
                      f'{",".join(SWEEP_MOSAIC)})')
  parser.add_argument('--mosaic_parts', default='fwd,bwd',
                      help='with --sweep_mosaic: fwd, bwd or both')
  parser.add_argument('--variants',
                      help='with --sweep_mosaic: comma list of variant names '
                      "as it prints them (e.g. 'fwd k128 s2 overlap'); "
                      'default all')
  parser.add_argument('--rounds', type=int, default=1,
                      help='time the impls (or with --sweep_mosaic the '
                      'variants) in this many rounds, in turn; medians')
  parser.add_argument('--no-check', action='store_true')
  result_files.add_out_flag(parser)
  args = parser.parse_args()

  names = (args.shapes.split(',') if args.shapes else
           QUICK if args.quick else
           SWEEP_MOSAIC if args.sweep_mosaic else [s.name for s in SHAPES])
  try:
    shapes = [shape_named(name) for name in names]
  except ValueError as e:
    parser.error(str(e))
  variants = args.variants and args.variants.split(',')
  for shape in shapes:
    if error := unknown_variants(variants, shape.head_dim):
      parser.error(error)
  causals = {'both': (False, True), 'yes': (True,), 'no': (False,)}[args.causal]
  impls = args.impls.split(',')
  if unknown := [i for i in impls if i not in IMPLS + PADDED]:
    parser.error(f'--impls {unknown} not among {IMPLS + PADDED}')
  if jax.devices()[0].platform != 'gpu':
    parser.error(f'times GPU kernels; this machine has '
                 f'{jax.devices()[0].platform} devices only')
  device = jax.devices()[0].device_kind
  print(f'{device}, jax {jax.__version__}', flush=True)

  kind = ('_sweep' if args.sweep else
          '_sweep_mosaic' if args.sweep_mosaic else '')
  path = result_files.new_path(args.out,
                               f'attention{kind}_{device.replace(" ", "_")}')
  meta = dict(device=device, date=datetime.datetime.now().isoformat(),
              jax=jax.__version__)
  records = []
  for shape in shapes:
    for causal in causals:
      if args.sweep:
        records += sweep(shape, causal)
      elif args.sweep_mosaic:
        records += sweep_mosaic(
            shape, causal, args.mosaic_parts.split(','),
            names=variants, rounds=args.rounds)
      else:
        records += compare(shape, causal, impls,
                           check_ours=not args.no_check, rounds=args.rounds)
      with open(path, 'w') as f:  # after each shape: a cut-off run keeps some
        json.dump(dict(meta, records=records), f, indent=1)
  print(f'wrote {path}')
  if args.sweep_mosaic:
    print_sweep_mosaic(records)
  elif not args.sweep:
    print_table(records)


def _case(r):
  return r['s'], r['d'], r['b'], r['h'], r['causal']


def _timed(records, impl, case):
  return next((r for r in records if r['impl'] == impl and _case(r) == case
               and 'error' not in r), None)


def ratios_to(records, impl, ref='cudnn', target=1.05):
  """{case: (fwd, fwd+bwd)} of impl's speed over ref's where both ran, and
  how many cases reach `target` both ways, forward and forward+backward."""
  ratios = {}
  for case in dict.fromkeys(map(_case, records)):
    ours, theirs = _timed(records, impl, case), _timed(records, ref, case)
    if ours and theirs:
      ratios[case] = (theirs['fwd_ms'] / ours['fwd_ms'],
                      theirs['fwdbwd_ms'] / ours['fwdbwd_ms'])
  met = dict(both=sum(min(r) >= target for r in ratios.values()),
             fwd=sum(r[0] >= target for r in ratios.values()),
             fwdbwd=sum(r[1] >= target for r in ratios.values()))
  return ratios, met


def print_table(records):
  impls = list(dict.fromkeys(r['impl'] for r in records))
  ours = [i for i in impls if i in OURS and 'cudnn' in impls]
  ratios = {impl: ratios_to(records, impl) for impl in ours}
  print('TFLOP/s fwd / fwd+bwd' + (', and the ratio to cuDNN' if ours else ''))
  print(f'{"shape":28s}' + ''.join(f'{i:>16s}' for i in impls) +
        ''.join(f'{i + "/cudnn":>16s}' for i in ours))
  for case in dict.fromkeys(map(_case, records)):
    cells = []
    for impl in impls:
      r = _timed(records, impl, case)
      cells.append('-' if r is None else
                   f'{r["tflops_fwd"]:.0f} / {r["tflops_fwdbwd"]:.0f}')
    for impl in ours:
      fwd_fwdbwd = ratios[impl][0].get(case)
      cells.append('-' if fwd_fwdbwd is None else
                   '{:.3f} / {:.3f}'.format(*fwd_fwdbwd))
    s, d, b, h, causal = case
    name = f's{s} d{d} b{b} h{h}{" causal" if causal else ""}'
    print(f'{name:28s}' + ''.join(f'{c:>16s}' for c in cells))
  for impl in ours:
    case_ratios, met = ratios[impl]
    print(f'{impl}: >= 1.05x cuDNN both ways on {met["both"]} of '
          f'{len(case_ratios)} shapes (forward {met["fwd"]}, '
          f'forward+backward {met["fwdbwd"]})')


if __name__ == '__main__':
  main()
