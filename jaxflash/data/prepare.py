"""Tokenize a corpus into uint16 token shards plus a metadata JSON.

  python -m jaxflash.data.prepare --dataset sample --data_dir data

Layout of a prepared dataset DATA_DIR/NAME/:
  meta.json                         counts, tokenizer, split seed, source
  train_00000.bin, ...              GPT-2 token ids, uint16, documents
  validation_00000.bin, ...         concatenated, each ending with EOS
The directory appears only when complete: it is written under a temporary
name and renamed at the end, so an interrupted run never looks finished.
"""
import json
import os
import shutil
import tempfile

from absl import app
from absl import flags
import numpy as np

from jaxflash.data import sample_corpus
from jaxflash.data import tokenizer

SPLITS = ('train', 'validation')
TOKEN_DTYPE = np.uint16
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 a shard
FORMAT_VERSION = 1
# The seed's split: 0.05% of documents for validation, seed 2357.
VAL_FRACTION = 0.0005
SPLIT_SEED = 2357
# The sample corpus is small; a larger share keeps its eval meaningful.
SAMPLE_VAL_FRACTION = 0.02


def _validation_mask(num_documents, val_fraction, seed):
  num_val = max(1, round(num_documents * val_fraction))
  chosen = np.random.default_rng(seed).permutation(num_documents)[:num_val]
  mask = np.zeros(num_documents, dtype=bool)
  mask[chosen] = True
  return mask


class _ShardWriter:
  """Appends token ids to fixed-size shard files of one split."""

  def __init__(self, directory, split):
    self.directory, self.split = directory, split
    self.shards, self.tokens, self.documents = [], 0, 0
    self._buffer, self._buffered = [], 0

  def add(self, ids):
    self._buffer.append(np.asarray(ids, dtype=TOKEN_DTYPE))
    self._buffered += len(ids)
    self.tokens += len(ids)
    self.documents += 1
    if self._buffered >= SHARD_TOKENS:
      self.flush()

  def flush(self):
    if not self._buffered:
      return
    name = f'{self.split}_{len(self.shards):05d}.bin'
    np.concatenate(self._buffer).tofile(os.path.join(self.directory, name))
    self.shards.append(name)
    self._buffer, self._buffered = [], 0


def write_dataset(documents, out_dir, *, source, val_fraction, seed):
  """Tokenizes `documents` (a list of str) into out_dir atomically.

  Returns the metadata. Reuses an existing out_dir whose metadata matches;
  refuses one that does not.
  """
  settings = dict(format_version=FORMAT_VERSION, tokenizer=tokenizer.NAME,
                  source=source, val_fraction=val_fraction, split_seed=seed)
  meta_path = os.path.join(out_dir, 'meta.json')
  if os.path.exists(out_dir):
    meta = read_meta(os.path.dirname(out_dir), os.path.basename(out_dir))
    if {k: meta.get(k) for k in settings} != settings:
      raise ValueError(
          f'{out_dir} holds a dataset prepared with other settings '
          f'({ {k: meta.get(k) for k in settings} }); remove it or choose '
          'another --data_dir')
    return meta
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix='.incomplete-', dir=parent)
  os.chmod(tmp_dir, 0o755)
  try:
    writers = {split: _ShardWriter(tmp_dir, split) for split in SPLITS}
    is_val = _validation_mask(len(documents), val_fraction, seed)
    empty = 0
    for text, val in zip(documents, is_val):
      ids = tokenizer.encode_document(text)
      if not ids:
        empty += 1
        continue
      writers['validation' if val else 'train'].add(ids)
    meta = dict(settings, eos_id=tokenizer.EOS_ID,
                token_dtype=np.dtype(TOKEN_DTYPE).name, empty_documents=empty,
                splits={})
    for split, writer in writers.items():
      writer.flush()
      meta['splits'][split] = dict(documents=writer.documents,
                                   tokens=writer.tokens, shards=writer.shards)
    with open(os.path.join(tmp_dir, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=2)
    os.rename(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return meta


def read_meta(data_dir, dataset):
  path = os.path.join(data_dir, dataset, 'meta.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'no prepared dataset at {os.path.join(data_dir, dataset)} (missing '
        f'meta.json); run `python -m jaxflash.data.prepare --dataset {dataset} '
        f'--data_dir {data_dir}`')
  with open(path) as f:
    return json.load(f)


def prepare_sample(data_dir):
  """Generates and tokenizes the built-in sample corpus (a few seconds)."""
  return write_dataset(list(sample_corpus.generate()),
                       os.path.join(data_dir, 'sample'),
                       source='jaxflash.data.sample_corpus',
                       val_fraction=SAMPLE_VAL_FRACTION, seed=SPLIT_SEED)


_DATASET = flags.DEFINE_enum('dataset', 'sample', ['sample'],
                             'Which corpus to prepare.')
_DATA_DIR = flags.DEFINE_string('data_dir', 'data',
                                'Where prepared datasets live.')


def main(argv):
  del argv
  meta = {'sample': prepare_sample}[_DATASET.value](_DATA_DIR.value)
  for split, info in meta['splits'].items():
    print(f'{split}: {info["documents"]:,} documents, {info["tokens"]:,} tokens')


if __name__ == '__main__':
  app.run(main)
