"""Data pipeline throughput on one host: GPT-2 tokenization and the loader.

Tokenization: tokens/s of one process over the sample corpus (or --input's
plain-text/JSON-lines files), then of `--workers` processes through the
prepare path. Loader: tokens/s of the training iterator (seq_len x batch, the
seed's 1024 x 512 by default) over a prepared dataset (--data_dir/--dataset),
or over synthetic shards of --synthetic_tokens random ids when none is given,
as numpy batches and as global jax.Arrays the way the trainer builds them.

  python benchmarks/data_throughput.py
  python benchmarks/data_throughput.py --data_dir data --dataset openwebtext
Prints one JSON object.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from jaxflash.data import prepare
from jaxflash.data import sample_corpus
from jaxflash.data import text_corpus
from jaxflash.data import tokenizer
# pylint: enable=g-import-not-at-top


def tokenization(documents, workers):
  """tokens/s of one process, and of `workers` through write_dataset."""
  tokenizer.get_tokenizer()  # loading the vocabulary is not tokenizing
  start, tokens = time.perf_counter(), 0
  for i in range(0, len(documents), prepare.CHUNK_DOCUMENTS):  # as workers do
    ids, _ = prepare.encode_documents(
        documents[i:i + prepare.CHUNK_DOCUMENTS])
    tokens += len(ids)
  one = tokens / (time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    meta = prepare.write_dataset(documents, os.path.join(tmp, 'd'),
                                 source='benchmark', val_fraction=0.01, seed=0,
                                 workers=workers)
    elapsed = time.perf_counter() - start
  tokens = sum(s['tokens'] for s in meta['splits'].values())
  megabytes = sum(len(d.encode()) for d in documents) / 1e6
  return dict(tokens=tokens, documents=len(documents), megabytes=megabytes,
              one_process_tokens_per_s=round(one),
              workers=workers, workers_tokens_per_s=round(tokens / elapsed),
              workers_seconds_incl_startup=round(elapsed, 2))


def synthetic_dataset(data_dir, num_tokens):
  """A prepared-dataset layout of random token ids, without tokenizing."""
  out = os.path.join(data_dir, 'synthetic')
  os.makedirs(out)
  rng = np.random.default_rng(0)
  splits = {}
  for split, count in (('train', num_tokens), ('validation', 1 << 20)):
    name = f'{split}_00000.bin'
    with open(os.path.join(out, name), 'wb') as f:
      for start in range(0, count, 1 << 24):
        rng.integers(0, 50256, min(1 << 24, count - start),
                     dtype=prepare.TOKEN_DTYPE).tofile(f)
    splits[split] = dict(documents=0, tokens=count, shards=[name])
  with open(os.path.join(out, 'meta.json'), 'w') as f:
    json.dump(dict(source='synthetic', splits=splits), f)
  return 'synthetic'


def loader_throughput(data_dir, dataset, seq_len, batch_size, prefetch,
                      seconds):
  """Tokens/s (seq_len a row) of the train iterator, numpy and global."""
  # Imported here: tokenization workers are spawned and import this module,
  # and JAX would add seconds to their start.
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from jaxflash.data import loader
  config = ml_collections.ConfigDict(dict(seed=0, batch_size=batch_size))
  config.data = ml_collections.ConfigDict(dict(
      data_dir=data_dir, dataset=dataset, seq_len=seq_len, prefetch=prefetch))
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  result = {}
  for name, convert in (
      ('numpy', lambda b: b),
      ('global_array', lambda b: jax.block_until_ready(
          jax.make_array_from_process_local_data(sharding, b)))):
    it = iter(loader.train_dataset(config))
    for _ in range(3):  # warm up the threads and the page cache
      convert(next(it))
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      convert(next(it))
      batches += 1
    elapsed = time.perf_counter() - start
    result[f'{name}_tokens_per_s'] = round(batches * batch_size * seq_len /
                                           elapsed)
    result[f'{name}_batches_per_s'] = round(batches / elapsed, 2)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--input', help='glob of text to tokenize instead of '
                      'the sample corpus')
  parser.add_argument('--documents', type=int, default=40_000,
                      help='sample corpus documents to tokenize')
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  parser.add_argument('--data_dir', help='prepared datasets; default: '
                      'synthetic shards in a temp dir')
  parser.add_argument('--dataset', default='openwebtext')
  parser.add_argument('--synthetic_tokens', type=int, default=1 << 28)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--batch_size', type=int, default=512)
  parser.add_argument('--prefetch', type=int, default=2)
  parser.add_argument('--seconds', type=float, default=10.0)
  args = parser.parse_args()

  if args.input:
    documents = text_corpus.read(args.input, text_corpus.new_stats())
  else:
    documents = list(sample_corpus.generate(args.documents))
  report = dict(cpu_count=os.cpu_count(),
                tokenization=tokenization(documents, args.workers))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir, dataset = args.data_dir, args.dataset
    if data_dir is None:
      data_dir, dataset = tmp, synthetic_dataset(tmp, args.synthetic_tokens)
    report['loader'] = dict(
        dataset=dataset, seq_len=args.seq_len, batch_size=args.batch_size,
        prefetch=args.prefetch,
        **loader_throughput(data_dir, dataset, args.seq_len, args.batch_size,
                            args.prefetch, args.seconds))
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  main()
