"""The longest sequence for which one GPT training step fits, on 1, 2, 4 GPUs.

  python benchmarks/longest_sequence.py --config configs/owt/gpt3_1.3b.py \
      --gpus 1,2,4 --variants remat=none

For each GPU count n, a process that sees the first n GPUs trains one
sequence of T tokens a step with the sequence split over all n (mesh.seq=n,
zigzag ring attention, parameters and Adam's moments sharded over the n GPUs;
plain flash attention on one GPU) and the model's positions sized to T.
A trial at T compiles the step and runs it once. From n * --start_per_gpu
the step between trials doubles while they fit, then bisects on a grid of
n * resolution tokens. A size counts only when a whole step (forward,
backward, AdamW update) ran; `exact` says the next grid size failed, else
`longest` is a lower bound (--max_trials ran out). Writes
<out>/longest_sequence_<gpu>.json and prints the growth over one GPU.
"""
import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top
import train_throughput  # sets up the path and jaxflash's XLA flags
import result_files
import jax
# pylint: enable=g-import-not-at-top

OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')
# The children let XLA's allocator take this much of each GPU (JAX's default
# is 0.75): the question is what fits on the GPU.
MEM_FRACTION = '0.95'


def peak_bytes():
  """The largest peak so far over this process's devices."""
  return max((d.memory_stats() or {}).get('peak_bytes_in_use', 0)
             for d in jax.local_devices())


def trial(config_path, variant, tokens):
  """One training step at `tokens` on every visible device: a record with
  its run time (None when it does not fit) and the peak memory so far."""
  n = jax.device_count()
  config = train_throughput.load_config(config_path)
  config.data.dataset = 'sample'  # random tokens; no dataset is read
  config.model.max_seq_len = config.data.seq_len = tokens
  config.mesh.update(fsdp=1, seq=n, tensor=1)
  config.batch_size = config.micro_batch_size = 1
  # Logits for 1,024 positions a GPU at a time: whole, they would bound T.
  if tokens % (n * 1024) == 0:
    config.model.loss_chunks = tokens // (n * 1024)
  train_throughput.apply_variant(config, variant)
  record = dict(tokens=tokens, step_s=None)
  state = batch = metrics = None
  try:
    mesh, state, step, batch = train_throughput.setup(config)
    with jax.set_mesh(mesh):
      start = time.perf_counter()
      compiled = step.lower(state, batch).compile()
      record['compile_s'] = time.perf_counter() - start
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      record['step_s'] = time.perf_counter() - start  # first run: not warm
      record['loss'] = float(metrics['loss'])
  except Exception as e:  # pylint: disable=broad-except
    if not any(s in str(e) for s in OUT_OF_MEMORY):
      raise
  finally:
    state = batch = metrics = None
    jax.clear_caches()
    gc.collect()
  record['peak_gib'] = peak_bytes() / 2**30
  print(json.dumps(record), file=sys.stderr, flush=True)
  return record


def search(config_path, variant, resolution, max_tokens, max_trials,
           start_per_gpu):
  """Trials ending in the longest T on the grid of n * resolution that fits:
  from n * start_per_gpu the step doubles while steps fit, then bisects.

  Peak memory does not predict the limit: XLA rematerializes more as a
  program nears the device's memory, so peaks sit at the limit long before
  a step stops fitting (measured: 1.3B on one H200 peaked at 126 GiB from
  53k to 65k tokens, and all of them ran).
  """
  n = jax.device_count()
  grid = n * resolution
  trials = []

  def fits(tokens):
    trials.append(trial(config_path, variant, tokens))
    return trials[-1]['step_s'] is not None

  good, bad = 0, None
  tokens, step = n * start_per_gpu // grid * grid, grid
  while len(trials) < max_trials and tokens <= max_tokens:
    if fits(tokens):
      good = tokens
    else:
      bad = tokens
    if bad is None:
      tokens, step = good + step, 2 * step
    elif bad - good <= grid:
      break
    else:
      tokens = (good + bad) // (2 * grid) * grid
  return dict(gpus=n, device=jax.devices()[0].device_kind, longest=good,
              first_failure=bad, exact=bad is not None and bad - good <= grid,
              trials=trials)


def _packed(counts):
  """GPU counts in groups that share the largest count's GPUs, in order."""
  groups = []
  for n in counts:
    if groups and sum(groups[-1]) + n <= max(counts):
      groups[-1].append(n)
    else:
      groups.append([n])
  return groups


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/owt/gpt3_1.3b.py')
  parser.add_argument('--gpus', default='1,2,4')
  parser.add_argument('--variants', default='remat=none',
                      help='key=value[;key=value] config overrides')
  parser.add_argument('--resolution', type=int, default=4096,
                      help='tokens per GPU the answer is rounded to')
  parser.add_argument('--max_tokens', type=int, default=1 << 24)
  parser.add_argument('--max_trials', type=int, default=8,
                      help='trials (compiles) per GPU count, at most')
  parser.add_argument('--start_per_gpu', type=int, default=8192,
                      help='tokens per GPU of the first trial')
  parser.add_argument('--concurrent', action='store_true',
                      help='search smaller GPU counts side by side on '
                      'disjoint GPUs (1 and 2 together, then 4)')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  result_files.add_out_flag(parser)
  args = parser.parse_args()
  if args.child:  # one GPU count: print the search as one JSON line
    print(json.dumps(search(args.config, args.variants, args.resolution,
                            args.max_tokens, args.max_trials,
                            args.start_per_gpu)))
    return
  counts = [int(x) for x in args.gpus.split(',')]
  results = []
  for group in (_packed(counts) if args.concurrent else [[n] for n in counts]):
    children, first = [], 0
    for n in group:
      env = dict(os.environ, CUDA_VISIBLE_DEVICES=','.join(
          map(str, range(first, first + n))), JAX_NUM_CPU_DEVICES=str(n))
      env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', MEM_FRACTION)
      first += n
      children.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
           '--child'], env=env, stdout=subprocess.PIPE, text=True))
    for child in children:
      out, _ = child.communicate()
      if child.returncode:
        sys.exit(f'a search child failed (exit {child.returncode})')
      results.append(json.loads(out.strip().splitlines()[-1]))
  one = next((r['longest'] for r in results if r['gpus'] == 1), None)
  # The children own the GPUs: this process never starts JAX's backend.
  kind = results[0]['device']
  result = dict(device=kind, date=datetime.datetime.now().isoformat(),
                jax=jax.__version__, config=args.config,
                variant=args.variants, resolution=args.resolution,
                max_tokens=args.max_tokens, concurrent=args.concurrent,
                mem_fraction=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION',
                                            MEM_FRACTION),
                xla_flags=os.environ.get('XLA_FLAGS', ''), results=results)
  path = result_files.new_path(args.out,
                               f'longest_sequence_{kind.replace(" ", "_")}')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {path}')
  print(f'{"GPUs":>4} {"longest tokens":>15} {"vs 1 GPU":>9}')
  for r in results:
    capped = '+' if r['first_failure'] is None else ''
    growth = f'{r["longest"] / one:.2f}x' if one else '-'
    print(f'{r["gpus"]:>4} {r["longest"]:>14,}{capped or " "} {growth:>9}')
  print('+: no failure up to --max_tokens')


if __name__ == '__main__':
  main()
