"""Tokenize a corpus into uint16 token shards plus a metadata JSON.

  python -m jaxflash.data.prepare --dataset sample --data_dir data
  python -m jaxflash.data.prepare --dataset openwebtext \
      --manual_dir ~/owt --data_dir data
  python -m jaxflash.data.prepare --dataset text --input 'corpus/*.jsonl' \
      --name mycorpus --data_dir data

Layout of a prepared dataset DATA_DIR/NAME/:
  meta.json                         counts, tokenizer, split seed, source
  train_00000.bin, ...              GPT-2 token ids, uint16, documents
  validation_00000.bin, ...         concatenated, each ending with EOS
OpenWebText is first built as a TFDS ArrayRecord dataset under DATA_DIR/tfds.
Every corpus then takes the same path: documents are numbered in source order,
split into train and validation by a seeded permutation, and tokenized in
parallel processes with ordered output, so the result does not depend on the
number of workers. The directory appears only when complete: it is written
under a temporary name and renamed at the end, so an interrupted run never
looks finished.
"""
import json
import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tqdm

from jaxflash.data import parallel
from jaxflash.data import sample_corpus
from jaxflash.data import text_corpus
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
SPLIT_METHOD = ('documents numbered in source order; validation holds the '
                'first max(1, round(documents * val_fraction)) of '
                'numpy.random.default_rng(split_seed).permutation(documents)')
# Documents a tokenization task: about a million OpenWebText tokens.
CHUNK_DOCUMENTS = 1024
OPENWEBTEXT_SOURCE = 'tfds:openwebtext/1.0.0'


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

  def add(self, ids, documents=1):
    """Appends `ids`, the tokens of `documents` whole documents."""
    self._buffer.append(np.asarray(ids, dtype=TOKEN_DTYPE))
    self._buffered += len(ids)
    self.tokens += len(ids)
    self.documents += documents
    if self._buffered >= SHARD_TOKENS:
      self.flush()

  def flush(self):
    if not self._buffered:
      return
    name = f'{self.split}_{len(self.shards):05d}.bin'
    np.concatenate(self._buffer).tofile(os.path.join(self.directory, name))
    self.shards.append(name)
    self._buffer, self._buffered = [], 0


# The documents a tokenization worker reads from, set once per process.
_documents = None


def _set_documents(documents):
  global _documents
  _documents = documents


def encode_documents(texts):
  """Tokens of `texts` (each with EOS), concatenated, and each one's length."""
  ids, lengths = [], np.zeros(len(texts), dtype=np.int64)
  for i, text in enumerate(texts):
    document = tokenizer.encode_document(text)
    lengths[i] = len(document)
    ids.extend(document)
  return np.array(ids, dtype=TOKEN_DTYPE), lengths


def _encode_range(bounds):
  start, stop = bounds
  return encode_documents(_documents[start:stop])


def _settings(source, val_fraction, seed):
  return dict(format_version=FORMAT_VERSION, tokenizer=tokenizer.NAME,
              source=source, val_fraction=val_fraction, split_seed=seed)


def _existing(out_dir, settings):
  """The metadata of out_dir if prepared with `settings`; None if absent."""
  if not os.path.exists(out_dir):
    return None
  meta = read_meta(os.path.dirname(out_dir), os.path.basename(out_dir))
  if {k: meta.get(k) for k in settings} != settings:
    raise ValueError(
        f'{out_dir} holds a dataset prepared with other settings '
        f'({ {k: meta.get(k) for k in settings} }); remove it or choose '
        'another --data_dir')
  return meta


def write_dataset(documents, out_dir, *, source, val_fraction, seed,
                  source_stats=None, workers=1, progress=False):
  """Tokenizes `documents` (a sequence of str) into out_dir atomically.

  Returns the metadata. Reuses an existing out_dir whose metadata matches;
  refuses one that does not. workers > 1 spawns processes, so `documents`
  must be picklable and a calling script needs `if __name__ == '__main__':`.
  """
  settings = _settings(source, val_fraction, seed)
  meta = _existing(out_dir, settings)
  if meta is not None:
    return meta
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix='.incomplete-', dir=parent)
  os.chmod(tmp_dir, 0o755)
  try:
    writers = {split: _ShardWriter(tmp_dir, split) for split in SPLITS}
    num_documents = len(documents)
    is_val = _validation_mask(num_documents, val_fraction, seed)
    chunks = [(start, min(start + CHUNK_DOCUMENTS, num_documents))
              for start in range(0, num_documents, CHUNK_DOCUMENTS)]
    results = parallel.ordered_map(_encode_range, chunks, workers,
                                   _set_documents, (documents,))
    empty, total, start_time = 0, 0, time.perf_counter()
    # Shown only where stderr is a terminal, so logs stay clean.
    with tqdm.tqdm(total=num_documents, unit='doc', unit_scale=True,
                   disable=None if progress else True,
                   desc=f'tokenizing {source}') as bar:
      for (start, stop), (ids, lengths) in zip(chunks, results):
        val = is_val[start:stop]
        nonempty = lengths > 0
        empty += int((~nonempty).sum())
        val_tokens = np.repeat(val, lengths)
        writers['train'].add(ids[~val_tokens], int((~val & nonempty).sum()))
        writers['validation'].add(ids[val_tokens], int((val & nonempty).sum()))
        total += len(ids)
        bar.update(stop - start)
        bar.set_postfix_str(
            f'{total:,} tokens, '
            f'{total / (time.perf_counter() - start_time):,.0f} tok/s',
            refresh=False)
    meta = dict(settings, eos_id=tokenizer.EOS_ID,
                token_dtype=np.dtype(TOKEN_DTYPE).name,
                documents=num_documents, empty_documents=empty,
                split_method=SPLIT_METHOD, source_stats=source_stats or {},
                splits={})
    for split, writer in writers.items():
      writer.flush()
      meta['splits'][split] = dict(documents=writer.documents,
                                   tokens=writer.tokens, shards=writer.shards)
    with open(os.path.join(tmp_dir, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=2)
    try:
      os.rename(tmp_dir, out_dir)
    except OSError:
      # Another process (e.g. a second host on a shared disk) finished first:
      # use its dataset if the settings match.
      meta = _existing(out_dir, settings)
      if meta is None:
        raise
      shutil.rmtree(tmp_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  finally:
    _set_documents(None)
  return meta


def read_meta(data_dir, dataset):
  path = os.path.join(data_dir, dataset, 'meta.json')
  if not os.path.exists(path):
    how = {'sample': '--dataset sample',
           'openwebtext': '--dataset openwebtext --manual_dir DIR'}.get(
               dataset, f'--dataset text --input GLOB --name {dataset}')
    raise FileNotFoundError(
        f'no prepared dataset at {os.path.join(data_dir, dataset)} (missing '
        f'meta.json); run `python -m jaxflash.data.prepare {how} '
        f'--data_dir {data_dir}`')
  with open(path) as f:
    return json.load(f)


def prepare_sample(data_dir, workers=1, progress=False):
  """Generates and tokenizes the built-in sample corpus (a few seconds)."""
  out_dir = os.path.join(data_dir, 'sample')
  source = 'jaxflash.data.sample_corpus'
  # Checked first so that a prepared sample costs no generation.
  meta = _existing(out_dir, _settings(source, SAMPLE_VAL_FRACTION, SPLIT_SEED))
  if meta is not None:
    return meta
  return write_dataset(list(sample_corpus.generate()), out_dir, source=source,
                       val_fraction=SAMPLE_VAL_FRACTION, seed=SPLIT_SEED,
                       workers=workers, progress=progress)


def prepare_text(pattern, data_dir, name='text', val_fraction=VAL_FRACTION,
                 workers=1, progress=False):
  """Tokenizes the plain-text or JSON-lines files matching `pattern`."""
  out_dir = os.path.join(data_dir, name)
  source = f'text:{pattern}'
  meta = _existing(out_dir, _settings(source, val_fraction, SPLIT_SEED))
  if meta is not None:
    return meta
  stats = text_corpus.new_stats()
  documents = text_corpus.read(pattern, stats)
  return write_dataset(documents, out_dir, source=source,
                       val_fraction=val_fraction, seed=SPLIT_SEED,
                       source_stats=stats, workers=workers, progress=progress)


def prepare_openwebtext(data_dir, manual_dir=None, workers=1, progress=False):
  """Builds the TFDS dataset from manual_dir, then tokenizes it."""
  # TFDS takes a second to import; only this corpus needs it.
  from jaxflash.data import openwebtext  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(data_dir, 'openwebtext')
  meta = _existing(out_dir, _settings(OPENWEBTEXT_SOURCE, VAL_FRACTION,
                                      SPLIT_SEED))
  if meta is not None:
    return meta
  builder = openwebtext.build(os.path.join(data_dir, 'tfds'), manual_dir,
                              workers)
  return write_dataset(openwebtext.Texts(builder), out_dir,
                       source=OPENWEBTEXT_SOURCE, val_fraction=VAL_FRACTION,
                       seed=SPLIT_SEED,
                       source_stats=dict(builder.info.metadata),
                       workers=workers, progress=progress)


def _define_flags():
  # Defined only when run as a program: spawned workers import this module
  # again, and absl refuses a flag defined twice.
  flags.DEFINE_enum('dataset', 'sample', ['sample', 'openwebtext', 'text'],
                    'Which corpus to prepare.')
  flags.DEFINE_string('data_dir', 'data', 'Where prepared datasets live.')
  flags.DEFINE_string('manual_dir', None,
                      'openwebtext: the folder holding the downloaded corpus.')
  flags.DEFINE_string('input', None,
                      'text: glob of files: .jsonl or .json ones hold a '
                      '{"text": ...} object a line, any other file is one '
                      'document.')
  flags.DEFINE_string('name', 'text', 'text: the prepared dataset\'s name.')
  flags.DEFINE_float('val_fraction', VAL_FRACTION,
                     'text: share of documents for validation.')
  flags.DEFINE_integer('workers', os.cpu_count(),
                       'Processes that decompress and tokenize.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.workers < 1:
    raise app.UsageError(f'--workers must be >= 1, got {f.workers}')
  if f.dataset != 'openwebtext' and f.manual_dir:
    raise app.UsageError('--manual_dir is only for --dataset openwebtext')
  if (f.dataset == 'text') != bool(f.input):
    raise app.UsageError('--dataset text needs --input GLOB, and only it')
  for flag in ('name', 'val_fraction'):
    if f[flag].present and f.dataset != 'text':
      raise app.UsageError(f'--{flag} is only for --dataset text')
  if not 0 < f.val_fraction < 1:
    raise app.UsageError(f'--val_fraction must be in (0, 1), got '
                         f'{f.val_fraction}')
  try:
    if f.dataset == 'sample':
      meta = prepare_sample(f.data_dir, f.workers, progress=True)
    elif f.dataset == 'openwebtext':
      meta = prepare_openwebtext(f.data_dir, f.manual_dir, f.workers,
                                 progress=True)
    else:
      meta = prepare_text(f.input, f.data_dir, f.name, f.val_fraction,
                          f.workers, progress=True)
  except (FileNotFoundError, ValueError) as e:  # input or data_dir problems
    sys.exit(f'error: {e}')
  for split, info in meta['splits'].items():
    print(f'{split}: {info["documents"]:,} documents, '
          f'{info["tokens"]:,} tokens')
  print(f'skipped or repaired: {meta.get("empty_documents", 0):,} empty '
        f'documents; source {meta.get("source_stats", {})}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
