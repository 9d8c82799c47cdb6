"""The longest sequence for which one GPT training step fits, on 1, 2, 4 GPUs.

  python benchmarks/longest_sequence.py --config configs/owt/gpt3_1.3b.py \
      --gpus 1,2,4 --variants remat=full

For each GPU count n, a process that sees the first n GPUs trains one
sequence of T tokens a step with the sequence split over all n (mesh.seq=n,
zigzag ring attention; plain flash attention on one GPU) and the model's
positions sized to T. T doubles from n * resolution until a step runs out of
memory, then bisects to `resolution` tokens. A size counts only when a whole
step (forward, backward, AdamW update) ran. Writes
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
import jax
# pylint: enable=g-import-not-at-top

OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')


def step_seconds(config_path, variant, tokens):
  """Seconds for one training step at `tokens` on every visible device, or
  None when it does not fit in memory."""
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
  try:
    mesh, state, step, batch = train_throughput.setup(config)
    with jax.set_mesh(mesh):
      state, metrics = step(state, batch)  # compiles
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      return time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except
    if not any(s in str(e) for s in OUT_OF_MEMORY):
      raise
    return None
  finally:
    state = batch = metrics = None
    jax.clear_caches()
    gc.collect()


def search(config_path, variant, resolution, max_tokens):
  """Trials [(tokens, seconds or None)] ending in the longest that fits."""
  n = jax.device_count()
  trials = []

  def fits(tokens):
    seconds = step_seconds(config_path, variant, tokens)
    trials.append(dict(tokens=tokens, step_s=seconds))
    print(json.dumps(trials[-1]), file=sys.stderr, flush=True)
    return seconds is not None

  good, bad = 0, None
  tokens = n * resolution
  while tokens <= max_tokens and fits(tokens):
    good, tokens = tokens, 2 * tokens
  if tokens <= max_tokens:
    bad = tokens
    while bad - good > resolution * n:
      # Midpoints on a grid of n * resolution keep T divisible by 2n.
      mid = (good + bad) // (2 * resolution * n) * resolution * n
      if fits(mid):
        good = mid
      else:
        bad = mid
  return dict(gpus=n, device=jax.devices()[0].device_kind, longest=good,
              first_failure=bad, trials=trials)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/owt/gpt3_1.3b.py')
  parser.add_argument('--gpus', default='1,2,4')
  parser.add_argument('--variants', default='remat=full',
                      help='key=value[;key=value] config overrides')
  parser.add_argument('--resolution', type=int, default=8192,
                      help='tokens per GPU the answer is rounded to')
  parser.add_argument('--max_tokens', type=int, default=1 << 24)
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results'))
  args = parser.parse_args()
  if args.child:  # one GPU count: print the search as one JSON line
    print(json.dumps(search(args.config, args.variants, args.resolution,
                            args.max_tokens)))
    return
  results = []
  for n in map(int, args.gpus.split(',')):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=','.join(map(str, range(n))),
               JAX_NUM_CPU_DEVICES=str(n))
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--child'],
        env=env, stdout=subprocess.PIPE, text=True, check=True)
    results.append(json.loads(child.stdout.strip().splitlines()[-1]))
  one = next((r['longest'] for r in results if r['gpus'] == 1), None)
  # The children own the GPUs: this process never starts JAX's backend.
  kind = results[0]['device']
  result = dict(device=kind, date=datetime.datetime.now().isoformat(),
                jax=jax.__version__, config=args.config,
                variant=args.variants, resolution=args.resolution,
                max_tokens=args.max_tokens,
                xla_flags=os.environ.get('XLA_FLAGS', ''), results=results)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out,
                      f'longest_sequence_{kind.replace(" ", "_")}.json')
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
