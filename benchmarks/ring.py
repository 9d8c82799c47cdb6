"""Ring attention benchmark on the GPUs of one host (one process drives all).

Per-GPU causal forward+backward TFLOP/s (FA2's counting: 4*b*s^2*h*d / 2 for
the causal forward, x3.5 with the backward, divided by the GPUs) of a global
sequence of N x T tokens, T tokens per GPU, 16 heads x 128, bf16, for:
  zigzag       ring attention, balanced layout (what the model uses)
  natural      the plain ring (device i holds chunk i): unbalanced
  allgather    all-gather K/V, then each GPU runs the kernel for its queries
               (blocks of future chunks masked by segment ids, not skipped)
  compute_only zigzag with communicate=False: same compute, no transfers
  comm_only    the ring's transfers alone (K/V forward; K/V + dK/dV backward)
  remat_full   zigzag under jax.checkpoint saving nothing: the backward
               re-runs the forward ring
  remat_save   zigzag under jax.checkpoint with the model's 'save_attention'
               policy (attention output and lse kept)
  single       the FA2 kernel on one GPU, causal, seq T (same tokens per GPU)

  python benchmarks/ring.py [--tokens 8192,16384,32768] [--gpus 2,4] \
      [--backend triton]
--backend picks the flash kernels of the ring's blocks and of `single`
(default 'auto': the Mosaic kernels on Hopper); allgather's segment ids keep
it on the Triton kernels.
Writes <out>/ring_<gpu>.json (default runs/benchmarks/). --profile DIR
traces one call of the zigzag ring and records, per GPU, how much of the
transfers' time ran under a compute kernel (benchmarks/trace_summary.py).
"""
import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
import jaxflash  # sets the XLA flags for overlap before JAX starts
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxflash import ring
import trace_summary
import result_files
from jaxflash.model import REMAT_POLICIES
from kernels import flash_attention
from kernels.flash_attention import BACKENDS, DEFAULT_BACKEND
# pylint: enable=g-import-not-at-top

HEADS, HEAD_DIM = 16, 128
INTERPRET = jax.default_backend() != 'gpu'  # a CPU dry run of the script


def time_fn(fn, *args, warmup=2, reps=10):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def fwd_bwd(attn):
  """jit(q, k, v, do) -> (out, dq, dk, dv): attn's forward and backward.

  The output is returned, as a model uses it, so a remat policy that saves
  nothing really runs the forward twice.
  """
  def run(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, *vjp(do)
  return jax.jit(run)


def causal_fwdbwd_flops(seq):
  return 3.5 * 4 * seq * seq * HEADS * HEAD_DIM / 2


def inputs(mesh, seq, sharded=True):
  keys = jax.random.split(jax.random.key(seq), 4)
  shape = (1, seq, HEADS, HEAD_DIM)
  arrays = [jax.random.normal(k, shape, jnp.bfloat16) for k in keys]
  if not sharded:
    return arrays
  sharding = NamedSharding(mesh, P(None, 'seq'))
  return [jax.device_put(a, sharding) for a in arrays]


def allgather_attention(mesh, n):
  """K/V all-gathered; each GPU attends its natural chunk to every key."""
  def local(q, k, v):
    i = jax.lax.axis_index('seq')
    k_all = jax.lax.all_gather(k, 'seq', axis=1, tiled=True)
    v_all = jax.lax.all_gather(v, 'seq', axis=1, tiled=True)
    chunk, seq = q.shape[1], k_all.shape[1]
    # Roll so this chunk's keys end the sequence (causal is end-aligned);
    # the future chunks that land in front are masked by segment ids.
    shift = seq - (i + 1) * chunk
    k_all, v_all = (jnp.roll(x, shift, axis=1) for x in (k_all, v_all))
    visible = jnp.roll(jnp.arange(seq) < (i + 1) * chunk, shift)
    kv_seg = visible.astype(jnp.int32)[None]
    q_seg = jnp.ones((1, chunk), jnp.int32)
    return flash_attention(q, k_all, v_all, causal=True,
                           segment_ids=(q_seg, kv_seg), interpret=INTERPRET)
  spec = P(None, 'seq')
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3,
                       out_specs=spec, check_vma=False)


def comm_only(mesh, n):
  """The ring's transfers alone: N-1 K/V hops forward, N-1 K/V + N dK/dV back."""
  perm = [(s, (s + 1) % n) for s in range(n)]

  def local(q, k, v, do):
    del q, do
    kv, total = (k, v), jnp.zeros((), jnp.float32)
    for _ in range(2 * (n - 1)):
      kv = jax.lax.ppermute(kv, 'seq', perm)
    dkv = tuple(x.astype(jnp.float32) for x in kv)
    for _ in range(n):
      dkv = jax.lax.ppermute(dkv, 'seq', perm)
    total = total + dkv[0][0, 0, 0, 0] + kv[0][0, 0, 0, 0]
    return total[None]
  spec = P(None, 'seq')
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4,
                               out_specs=P('seq'), check_vma=False))


def check_correct(mesh, n, seq, backend):
  """zigzag ring vs the one-device kernel on one head group, rel error."""
  q, k, v, _ = inputs(mesh, seq, sharded=False)
  q, k, v = (x[:, :, :2] for x in (q, k, v))
  want = flash_attention(q, k, v, causal=True, interpret=INTERPRET,
                         backend=backend).astype(jnp.float32)
  to = lambda x: ring.to_layout(x, n, 'zigzag')
  got = ring.from_layout(ring.ring_attention(
      to(q), to(k), to(v), mesh=mesh, layout='zigzag', impl='flash',
      backend=backend), n, 'zigzag').astype(jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def traced_overlap(fn, args, trace_dir):
  """Per GPU: collectives' busy ms, the part under compute, compute ms."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(fn(*args))
  return [dict(comm_ms=comm, hidden_ms=hidden, compute_ms=compute)
          for _, comm, hidden, compute in trace_summary.overlap(trace_dir)]


def print_schedule(fn, args):
  """The compiled entry computation's order of transfers and kernels."""
  text = fn.lower(*args).compile().as_text()
  entry = text[text.index('ENTRY'):]
  keys = ('collective-permute-start', 'collective-permute-done',
          'collective-permute(', 'custom-call', 'conditional')
  for line in entry.splitlines():
    op = next((k for k in keys if k in line), None)
    if op:
      print('  ', op, line.split('=')[0].strip()[:60])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tokens', default='8192,16384,32768',
                      help='tokens per GPU')
  parser.add_argument('--gpus', default=None, help='ring sizes, e.g. 2,4')
  parser.add_argument('--variants', default=None,
                      help='comma list, e.g. zigzag,compute_only')
  parser.add_argument('--profile', default=None, metavar='DIR',
                      help='trace the zigzag ring once into DIR/<N>_<T>')
  parser.add_argument('--backend', default=DEFAULT_BACKEND, choices=BACKENDS,
                      help="the flash kernels' backend")
  parser.add_argument('--schedule', action='store_true',
                      help='print the compiled zigzag schedule and stop')
  result_files.add_out_flag(parser)
  args = parser.parse_args()
  devices = jax.devices()
  sizes = ([int(x) for x in args.gpus.split(',')] if args.gpus
           else [len(devices)])
  records = []
  for t in [int(x) for x in args.tokens.split(',')]:
    single = fwd_bwd(lambda q, k, v: flash_attention(
        q, k, v, causal=True, interpret=INTERPRET, backend=args.backend))
    q, k, v, do = inputs(None, t, sharded=False)
    ms = time_fn(single, q, k, v, do) * 1e3
    records.append(dict(variant='single', gpus=1, tokens_per_gpu=t, ms=ms,
                        tflops_per_gpu=causal_fwdbwd_flops(t) / ms / 1e9))
    print(records[-1], flush=True)
    for n in sizes:
      mesh = jax.make_mesh((n,), ('seq',), devices=devices[:n],
                           axis_types=(jax.sharding.AxisType.Auto,))
      seq = n * t
      rel_err = check_correct(mesh, n, seq, args.backend)
      zigzag = functools.partial(ring.ring_attention, mesh=mesh,
                                 layout='zigzag', impl='flash',
                                 backend=args.backend)
      print(f'N={n} T={t}: zigzag vs one-device kernel rel err {rel_err:.1e}',
            flush=True)
      variants = {
          'zigzag': fwd_bwd(zigzag),
          'natural': fwd_bwd(functools.partial(zigzag, layout='natural')),
          'compute_only': fwd_bwd(functools.partial(zigzag,
                                                    communicate=False)),
          'allgather': fwd_bwd(allgather_attention(mesh, n)),
          'comm_only': comm_only(mesh, n),
          'remat_full': fwd_bwd(jax.checkpoint(
              zigzag, policy=jax.checkpoint_policies.nothing_saveable)),
          'remat_save': fwd_bwd(jax.checkpoint(
              zigzag, policy=REMAT_POLICIES['save_attention'])),
      }
      if args.variants:
        variants = {k: variants[k] for k in args.variants.split(',')}
      args_n = inputs(mesh, seq)
      if args.schedule:
        print(f'N={n} T={t} zigzag fwd+bwd schedule:')
        print_schedule(variants['zigzag'], args_n)
        continue
      for name, fn in variants.items():
        try:
          ms = time_fn(fn, *args_n) * 1e3
        except Exception as e:  # pylint: disable=broad-except
          records.append(dict(variant=name, gpus=n, tokens_per_gpu=t,
                              error=f'{type(e).__name__}: {str(e)[:200]}'))
          print(records[-1], flush=True)
          continue
        tflops = (None if name == 'comm_only'
                  else causal_fwdbwd_flops(seq) / n / ms / 1e9)
        records.append(dict(variant=name, gpus=n, tokens_per_gpu=t, ms=ms,
                            tflops_per_gpu=tflops,
                            rel_err=rel_err if name == 'zigzag' else None))
        if args.profile and name == 'zigzag':
          records[-1]['overlap'] = traced_overlap(
              fn, args_n, os.path.join(args.profile, f'{n}_{t}'))
        print(records[-1], flush=True)
  result = dict(device=devices[0].device_kind, num_gpus=len(devices),
                date=datetime.datetime.now().isoformat(),
                jax=jax.__version__, backend=args.backend, heads=HEADS,
                head_dim=HEAD_DIM,
                dtype='bfloat16', causal=True,
                xla_flags=os.environ.get('XLA_FLAGS', ''), records=records)
  path = result_files.new_path(
      args.out, f'ring_{devices[0].device_kind.replace(" ", "_")}')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {path}')
  print('per-GPU causal fwd+bwd TFLOP/s (ms)')
  single = {r['tokens_per_gpu']: r for r in records if r['variant'] == 'single'}
  for r in records:
    if r['variant'] == 'single' or 'error' in r:
      continue
    ratio = (f" = {r['tflops_per_gpu'] / single[r['tokens_per_gpu']]['tflops_per_gpu']:.0%} of single"
             if r['tflops_per_gpu'] else '')
    tf = f"{r['tflops_per_gpu']:.0f}" if r['tflops_per_gpu'] else '-'
    print(f"N={r['gpus']} T={r['tokens_per_gpu']:>6} {r['variant']:>12}: "
          f"{tf:>4} ({r['ms']:.2f} ms){ratio}")
  for t, r in single.items():
    print(f"single T={t:>6}: {r['tflops_per_gpu']:.0f} ({r['ms']:.2f} ms)")


if __name__ == '__main__':
  main()
