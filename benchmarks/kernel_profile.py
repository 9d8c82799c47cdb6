"""Where a Mosaic attention kernel's time goes, warpgroup by warpgroup.

Runs the forward or backward of one shape with Mosaic GPU's in-kernel
profiler on (CompilerParams.profile_space/profile_dir): every warpgroup
records the clock at the edges of the kernels' named scopes (wait_k, qk,
softmax, meet, pv, ...). Prints, per kernel and warpgroup role, each
region's share of the warpgroup's time (exclusive of nested regions; 'other'
is time in no region), averaged over the recorded CTAs, and one CTA's first
steps as a timeline. Each event costs a few clocks, so the run is a little
slower than an unprofiled one: shares, not timings.

  python benchmarks/kernel_profile.py --shape s2048_d64 --part fwd
  python benchmarks/kernel_profile.py --shape s8192_d128 --part bwd \\
      --variant 'bwd q64 k128 s2' --causal --out /tmp/prof
Writes <out>/profile_<shape>[_causal]_<variant, or fwd_default or
bwd_default>.json: the summaries (the raw traces, Perfetto's format, stay in
<out>/traces/).
"""
import argparse
import collections
import dataclasses
import glob
import json
import os
import statistics
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
import attention as bench
from kernels import flash_mosaic
from kernels.flash_attention import flash_attention_bwd, flash_attention_fwd
# pylint: enable=g-import-not-at-top


def roles(consumers):
  """A CTA's warpgroups in order: the consumers, then the producer."""
  return tuple(f'consumer {w}' for w in range(consumers)) + ('producer',)


def region_times(events):
  """{region: exclusive clocks} and the span of one warpgroup's trace
  (events: its B/E records in order; ts in kilo-clocks)."""
  totals = collections.Counter()
  stack = []  # [name, start, time in nested regions]
  for event in events:
    t = event['ts'] * 1e3
    if event['ph'] == 'B':
      stack.append([event['name'], t, 0.0])
    else:
      name, start, nested = stack.pop()
      totals[name] += t - start - nested
      if stack:
        stack[-1][2] += t - start
  span = (events[-1]['ts'] - events[0]['ts']) * 1e3 if events else 0.0
  totals['other'] = span - sum(totals.values())
  return totals, span


def summarize(trace, consumers=2):
  """Per role: {region: mean share of the warpgroup's span}, mean span in
  clocks and the number of CTAs recorded."""
  by_tid = collections.defaultdict(list)
  for event in trace['traceEvents']:
    by_tid[event['tid']].append(event)
  shares = collections.defaultdict(lambda: collections.defaultdict(list))
  spans = collections.defaultdict(list)
  names = roles(consumers)
  for tid, events in by_tid.items():
    role = names[(tid - 1) % len(names)]
    totals, span = region_times(events)
    if span <= 0:
      continue
    spans[role].append(span)
    for name, clocks in totals.items():
      shares[role][name].append(clocks / span)
  out = {}
  for role in names:
    if not spans[role]:
      continue
    n = len(spans[role])
    out[role] = dict(
        ctas=n, span_clocks=statistics.mean(spans[role]),
        share={name: sum(v) / n for name, v in sorted(
            shares[role].items(), key=lambda kv: -sum(kv[1]))})
  return out


def timeline(trace, consumers=2, events_per_wg=40):
  """The first CTA's consumers, first events, merged in time order: (clock
  from the CTA's start, role, B/E, region)."""
  by_tid = collections.defaultdict(list)
  for event in trace['traceEvents']:
    by_tid[event['tid']].append(event)
  first = min(by_tid)
  rows, names = [], roles(consumers)
  for tid in (first, first + 1):
    role = names[(tid - 1) % len(names)]
    rows += [(e['ts'], role, e['ph'], e['name'])
             for e in by_tid.get(tid, [])[:events_per_wg]]
  rows.sort(key=lambda row: row[0])  # stable: nested edges keep their order
  t0 = rows[0][0] if rows else 0
  return [(round((t - t0) * 1e3), role, ph, name) for t, role, ph, name in rows]


def variant_tuning(shape, part, name):
  """The MosaicTuning of attention.py's sweep variant `name`, or the
  defaults for None."""
  if name is None:
    return None
  for p, tuning in bench.mosaic_variants(shape.head_dim):
    if p == part and bench.describe_mosaic(p, tuning) == name:
      return tuning
  known = [bench.describe_mosaic(p, t)
           for p, t in bench.mosaic_variants(shape.head_dim) if p == part]
  raise SystemExit(f'unknown {part} variant {name!r}: one of {known}')


def profile(shape, causal, part, tuning, space, trace_dir):
  """Runs the part once with the profiler on; returns the traces written."""
  q, k, v, do = bench.inputs(shape, jax.random.PRNGKey(0))
  kwargs = dict(causal=causal, backend='mosaic', mosaic_config=tuning)
  if part == 'bwd':  # the forward unprofiled: at d128 its shared memory
    # leaves no room for a trace buffer
    o, lse = jax.block_until_ready(
        flash_attention_fwd(q, k, v, causal=causal, backend='mosaic'))
  flash_mosaic.COMPILER_PARAMS = dataclasses.replace(
      flash_mosaic.COMPILER_PARAMS, profile_space=space,
      profile_dir=trace_dir, profile_bounds_check=True)
  if part == 'fwd':
    jax.block_until_ready(flash_attention_fwd(q, k, v, **kwargs))
  else:
    jax.block_until_ready(flash_attention_bwd(q, k, v, o, lse, do, **kwargs))
  jax.effects_barrier()  # the traces are written by host callbacks
  return sorted(glob.glob(os.path.join(trace_dir, '*')))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='s2048_d64',
                      help='as in attention.py: s2048_d64 or b4_s1024_h32_d80')
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--part', choices=('fwd', 'bwd'), default='fwd')
  parser.add_argument('--variant', default=None,
                      help="an attention.py sweep variant, e.g. 'fwd k128 s3 "
                      "pingpong'; default: the defaults")
  parser.add_argument('--space', type=int, default=1000,
                      help='profiled ranges per warpgroup (16 bytes of '
                      'shared memory each; the trace is cut off past them)')
  parser.add_argument('--timeline', type=int, default=24,
                      help="timeline rows to print (all go to the JSON)")
  parser.add_argument('--out', default=tempfile.mkdtemp())
  args = parser.parse_args()
  shape = bench.shape_named(args.shape)
  tuning = variant_tuning(shape, args.part, args.variant)
  # Named variants start with their part; the defaults get it added.
  variant = (args.variant or f'{args.part} default').replace(' ', '_')
  name = (f'profile_{shape.name}{"_causal" if args.causal else ""}_'
          f'{variant}')
  trace_dir = os.path.join(args.out, 'traces', name)
  os.makedirs(trace_dir, exist_ok=True)
  for path in glob.glob(os.path.join(trace_dir, '*')):
    os.remove(path)
  space = args.space
  while True:
    try:
      paths = profile(shape, args.causal, args.part, tuning, space, trace_dir)
      break
    except ValueError as e:  # the trace buffer lives in shared memory
      if 'shared memory' not in str(e) or space <= 50:
        raise
      space //= 2
      print(f'shared memory short: {space} ranges per warpgroup')
  # Warpgroups a CTA: the forward's consumers (three in some defaults and
  # variants) plus the producer; both backward kernels have two consumers.
  consumers = 2
  if args.part == 'fwd':
    consumers = (tuning.fwd if tuning and tuning.fwd else
                 flash_mosaic.MosaicConfig.default(
                     shape.head_dim, args.causal, shape.seq)).consumers
  report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                shape=shape.name, causal=args.causal, part=args.part,
                variant=args.variant or 'default', space=space, kernels=[])
  for path in paths:
    with open(path) as f:
      trace = json.load(f)
    kernel = dict(trace=os.path.basename(path),
                  roles=summarize(trace, consumers),
                  timeline=timeline(trace, consumers))
    report['kernels'].append(kernel)
    print(f'== {kernel["trace"]}')
    for role, s in kernel['roles'].items():
      top = ', '.join(f'{name} {share:.0%}' for name, share in
                      s['share'].items() if share >= 0.005)
      print(f'  {role} ({s["ctas"]} CTAs, {s["span_clocks"]:.0f} clocks): '
            f'{top}')
    for row in kernel['timeline'][:args.timeline]:
      print('   ', *row)
  with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
    json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
