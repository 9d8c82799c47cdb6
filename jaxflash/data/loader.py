"""Grain pipeline: fixed windows of seq_len + 1 tokens over token shards.

Window i of a shard is tokens[i*seq_len : i*seq_len + seq_len + 1] (inputs and
shifted targets); windows never cross shards. Training shuffles globally with a
seed and repeats, reshuffling each epoch; each JAX process reads only every
process_count-th element, so hosts never duplicate or skip data.
"""
import os

from absl import logging
import grain
import jax
import numpy as np

from jaxflash.data import prepare


class TokenWindows:
  """Random access to the windows of memory-mapped token shards."""

  def __init__(self, paths, seq_len):
    self.seq_len = seq_len
    self._shards = [np.memmap(p, dtype=prepare.TOKEN_DTYPE, mode='r')
                    for p in paths]
    counts = [max(0, (len(s) - 1) // seq_len) for s in self._shards]
    self._starts = np.cumsum([0] + counts)

  def __len__(self):
    return int(self._starts[-1])

  def __getitem__(self, index):
    shard = int(np.searchsorted(self._starts, index, side='right')) - 1
    offset = (index - self._starts[shard]) * self.seq_len
    window = self._shards[shard][offset:offset + self.seq_len + 1]
    return np.asarray(window, dtype=np.int32)


def windows(data_dir, dataset, split, seq_len):
  meta = prepare.read_meta(data_dir, dataset)
  paths = [os.path.join(data_dir, dataset, name)
           for name in meta['splits'][split]['shards']]
  source = TokenWindows(paths, seq_len)
  if not len(source):
    raise ValueError(f'{dataset}/{split} has fewer than {seq_len + 1} tokens '
                     f'a shard; lower data.seq_len')
  return source


def train_dataset(config):
  """Per-process batches [batch_size // process_count, seq_len + 1], forever."""
  source = windows(config.data.data_dir, config.data.dataset, 'train',
                   config.data.seq_len)
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(config.batch_size // jax.process_count(), drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, config.data.prefetch),
      prefetch_buffer_size=config.data.prefetch))


def eval_batches(config):
  """The first eval_batches batches of the validation split, in order; fewer
  where the split runs out, so no window counts twice (one batch, then
  repeating windows, where the split holds less than a batch)."""
  if not config.eval_batches:
    return []
  source = windows(config.data.data_dir, config.data.dataset, 'validation',
                   config.data.seq_len)
  count = min(config.eval_batches, max(1, len(source) // config.batch_size))
  if count < config.eval_batches or len(source) < config.batch_size:
    logging.warning(
        'the validation split of %s has %d windows of %d tokens: evaluating '
        'on %d batch(es) of %d, not eval_batches=%d%s', config.data.dataset,
        len(source), config.data.seq_len + 1, count, config.batch_size,
        config.eval_batches, ', windows repeated to fill it'
        if len(source) < config.batch_size else '')
  ds = grain.MapDataset.source(source).repeat()
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(config.batch_size // jax.process_count(), drop_remainder=True)
  return [ds[i] for i in range(count)]
