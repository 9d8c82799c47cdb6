"""Where device time goes: a jax.profiler trace summed by kernel.

  python benchmarks/trace_summary.py TRACE_DIR [--top 30]

TRACE_DIR is what jax.profiler.trace(..., create_perfetto_trace=True)
wrote (the newest perfetto_trace.json.gz under it is read). Prints each
kernel's total time on the GPU streams (launches grouped by name without
numeric suffixes), its share and call count, biggest first; `summarize`
returns the same rows for a benchmark's JSON. `overlap` says, per device,
how much of the collectives' (NCCL kernels') time ran while a compute kernel
ran too: whether transfers are hidden.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re


def _latest_trace(trace_dir):
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
  return max(paths, key=os.path.getmtime)


def _kernel_events(trace_dir):
  """{device pid: [kernel events on its streams]} of the newest trace."""
  with gzip.open(_latest_trace(trace_dir)) as f:
    events = json.load(f)['traceEvents']
  device_pids = {e['pid'] for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and '/device:' in e['args'].get('name', '')}
  # A device holds kernel rows ('Stream #N') and derived rows ('XLA Ops',
  # 'XLA Modules') covering the same time: sum the streams only.
  threads = {(e['pid'], e['tid']): e['args'].get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'
             and e['pid'] in device_pids}
  streams = {k for k, name in threads.items() if name.startswith('Stream')}
  kernels = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in device_pids and (
        not streams or (e['pid'], e.get('tid')) in streams):
      kernels[e['pid']].append(e)
  return kernels


def summarize(trace_dir, top=30):
  """[(kernel, total_ms, share, calls)] on the device streams, biggest first."""
  total_us = collections.Counter()
  calls = collections.Counter()
  for events in _kernel_events(trace_dir).values():
    for e in events:
      # Launches of one kernel share a name up to XLA's numeric suffixes.
      name = re.sub(r'[._]\d+$', '', e['name'])
      total_us[name] += e.get('dur', 0)
      calls[name] += 1
  grand = sum(total_us.values()) or 1
  return [(name, us / 1e3, us / grand, calls[name])
          for name, us in total_us.most_common(top)]


def _union(intervals):
  merged = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return merged


def overlap(trace_dir):
  """[(device pid, comm_ms, comm_ms_hidden, compute_ms)]: per device, the
  NCCL kernels' busy time, the part of it during which a compute kernel ran,
  and the compute kernels' busy time."""
  rows = []
  for pid, events in sorted(_kernel_events(trace_dir).items()):
    spans = {True: [], False: []}
    for e in events:
      spans['nccl' in e['name'].lower()].append(
          (e['ts'], e['ts'] + e.get('dur', 0)))
    comm, compute = _union(spans[True]), _union(spans[False])
    hidden, j = 0.0, 0
    for start, end in comm:
      while j < len(compute) and compute[j][1] <= start:
        j += 1
      k = j
      while k < len(compute) and compute[k][0] < end:
        hidden += min(end, compute[k][1]) - max(start, compute[k][0])
        k += 1
    busy = lambda spans: sum(end - start for start, end in spans) / 1e3
    rows.append((pid, busy(comm), hidden / 1e3, busy(compute)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace_dir')
  parser.add_argument('--top', type=int, default=30)
  args = parser.parse_args()
  for name, ms, share, n in summarize(args.trace_dir, args.top):
    print(f'{ms:10.2f} ms {share:6.1%} {n:6d}  {name[:100]}')
  for pid, comm, hidden, compute in overlap(args.trace_dir):
    if comm:
      print(f'device {pid}: collectives {comm:.2f} ms, {hidden:.2f} ms of it '
            f'under compute; compute {compute:.2f} ms')


if __name__ == '__main__':
  main()
