"""Sample corpus, tokenizer, prepared shards and the Grain loader."""
import json
import os

import ml_collections
import numpy as np
import pytest

from jaxflash.data import loader
from jaxflash.data import prepare
from jaxflash.data import sample_corpus
from jaxflash.data import tokenizer


def test_tokenizer_is_gpt2():
  enc = tokenizer.get_tokenizer()
  assert enc.n_vocab == 50257
  assert enc.encode_ordinary('Hello world') == [15496, 995]
  assert tokenizer.encode_document('Hi') == [17250, tokenizer.EOS_ID]
  assert tokenizer.encode_document('') == []


def test_sample_corpus_is_deterministic():
  a = list(sample_corpus.generate(num_documents=20, seed=3))
  assert a == list(sample_corpus.generate(num_documents=20, seed=3))
  assert a != list(sample_corpus.generate(num_documents=20, seed=4))


def test_prepare_writes_counts_and_reuses(tmp_path):
  docs = [f'Document number {i}.' for i in range(50)] + ['']
  out = tmp_path / 'toy'
  meta = prepare.write_dataset(docs, str(out), source='test', val_fraction=0.1,
                               seed=1)
  expected = sum(len(tokenizer.encode_document(d)) for d in docs)
  splits = meta['splits']
  assert splits['train']['tokens'] + splits['validation']['tokens'] == expected
  assert splits['validation']['documents'] == 5
  assert meta['empty_documents'] == 1
  tokens = np.concatenate([
      np.fromfile(out / name, dtype=np.uint16)
      for split in prepare.SPLITS for name in splits[split]['shards']])
  assert len(tokens) == expected and (tokens == tokenizer.EOS_ID).sum() == 50
  assert json.loads((out / 'meta.json').read_text()) == meta
  # Same settings: reused. Other settings: refused, nothing overwritten.
  assert prepare.write_dataset(docs, str(out), source='test', val_fraction=0.1,
                               seed=1) == meta
  with pytest.raises(ValueError, match='other settings'):
    prepare.write_dataset(docs, str(out), source='test', val_fraction=0.2,
                          seed=1)
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.incomplete')]


def test_interrupted_prepare_leaves_nothing(tmp_path):
  class Exploding(list):
    def __getitem__(self, index):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    prepare.write_dataset(Exploding(['a', 'b']), str(tmp_path / 'x'),
                          source='test', val_fraction=0.5, seed=0)
  assert os.listdir(tmp_path) == []


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='jaxflash.data.prepare'):
    prepare.read_meta(str(tmp_path), 'openwebtext')


def _config(data_dir, batch_size=4):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = batch_size
  c.eval_batches = 2
  c.data = ml_collections.ConfigDict(dict(
      data_dir=str(data_dir), dataset='toy', seq_len=8, prefetch=2))
  return c


@pytest.fixture
def toy_data(tmp_path):
  docs = [' '.join(f'w{n}x{i}' for i in range(n)) for n in range(1, 60)]
  prepare.write_dataset(docs, str(tmp_path / 'toy'), source='test',
                        val_fraction=0.1, seed=0)
  return tmp_path


def test_windows_are_shifted_slices(toy_data):
  source = loader.windows(str(toy_data), 'toy', 'train', 8)
  meta = prepare.read_meta(str(toy_data), 'toy')
  tokens = np.fromfile(toy_data / 'toy' / meta['splits']['train']['shards'][0],
                       dtype=np.uint16)
  assert len(source) == (len(tokens) - 1) // 8
  for i in (0, 1, len(source) - 1):
    np.testing.assert_array_equal(source[i], tokens[i * 8:i * 8 + 9])


def test_train_batches_cover_an_epoch_and_resume(toy_data):
  config = _config(toy_data)
  n = len(loader.windows(str(toy_data), 'toy', 'train', 8))
  it = iter(loader.train_dataset(config))
  batches = [next(it) for _ in range(n // 4)]
  assert batches[0].shape == (4, 9) and batches[0].dtype == np.int32
  source = loader.windows(str(toy_data), 'toy', 'train', 8)
  all_windows = {tuple(source[i]) for i in range(n)}
  assert len(all_windows) == n
  rows = [tuple(r) for b in batches for r in b]
  # One epoch: distinct windows of the split, not in stored order.
  assert len(set(rows)) == len(rows) and set(rows) <= all_windows
  assert rows[:4] != [tuple(source[i]) for i in range(4)]
  state = it.get_state()
  expected = next(it)
  again = iter(loader.train_dataset(config))
  again.set_state(state)
  np.testing.assert_array_equal(next(again), expected)


def test_eval_batches_are_fixed(toy_data):
  a = loader.eval_batches(_config(toy_data, batch_size=2))
  b = loader.eval_batches(_config(toy_data, batch_size=2))
  assert len(a) == 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_eval_batches_stop_where_the_validation_split_runs_out(toy_data,
                                                               caplog):
  """No validation window counts twice: eval_batches beyond the split's
  distinct batches are dropped, with a warning; a split smaller than one
  batch gives one batch that repeats windows, and says so."""
  windows = len(loader.windows(str(toy_data), 'toy', 'validation', 8))
  config = _config(toy_data, batch_size=2)
  config.eval_batches = windows  # twice the windows the split has
  batches = loader.eval_batches(config)
  assert len(batches) == windows // 2
  rows = [tuple(r) for b in batches for r in b]
  assert len(set(rows)) == len(rows)
  assert f'evaluating on {windows // 2} batch(es) of 2, not eval_batches=' \
      f'{windows}' in caplog.text
  caplog.clear()
  config = _config(toy_data, batch_size=windows + 1)
  assert len(loader.eval_batches(config)) == 1
  assert 'windows repeated to fill it' in caplog.text


def test_processes_read_disjoint_slices(toy_data, monkeypatch):
  config = _config(toy_data)
  single = iter(loader.train_dataset(config))
  expected = [next(single) for _ in range(3)]
  per_process = []
  for index in range(2):
    monkeypatch.setattr(loader.jax, 'process_index', lambda i=index: i)
    monkeypatch.setattr(loader.jax, 'process_count', lambda: 2)
    it = iter(loader.train_dataset(config))
    per_process.append([next(it) for _ in range(3)])
  for step in range(3):
    a, b = per_process[0][step], per_process[1][step]
    assert a.shape == (2, 9)
    hosts = {tuple(r) for r in np.concatenate([a, b])}
    # Together the hosts read exactly the one-process global batch.
    assert hosts == {tuple(r) for r in expected[step]} and len(hosts) == 4


def test_processes_split_an_epoch_without_overlap(toy_data, monkeypatch):
  config = _config(toy_data)
  n = len(loader.windows(str(toy_data), 'toy', 'train', 8))
  rows = []
  for index in range(2):
    monkeypatch.setattr(loader.jax, 'process_index', lambda i=index: i)
    monkeypatch.setattr(loader.jax, 'process_count', lambda: 2)
    it = iter(loader.train_dataset(config))
    rows.append([tuple(r) for _ in range(n // 4) for r in next(it)])
  # n // 4 global batches of 4 is at most an epoch: hosts never share a window.
  assert not set(rows[0]) & set(rows[1])
  assert len(set(rows[0]) | set(rows[1])) == 2 * len(rows[0]) == n // 4 * 4


def test_orbax_checkpoint_resumes_with_the_next_batch(toy_data, tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxflash import checkpoint  # pylint: disable=g-import-not-at-top
  config = _config(toy_data)
  config.keep_checkpoints = 2
  state = dict(step=jnp.zeros((), jnp.int32))
  it = iter(loader.train_dataset(config))
  for _ in range(3):
    next(it)
  manager = checkpoint.make_manager(str(tmp_path / 'run'), config)
  checkpoint.save(manager, 3, state, it)
  manager.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  again = iter(loader.train_dataset(config))
  manager = checkpoint.make_manager(str(tmp_path / 'run'), config)
  assert checkpoint.restore_latest(manager, state, again) is not None
  for batch in expected:
    np.testing.assert_array_equal(next(again), batch)
  manager.close()


def test_sample_goes_through_the_writer_and_is_cheap_to_reuse(tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  meta = prepare.prepare_sample(str(tmp_path))
  assert meta['source'] == 'jaxflash.data.sample_corpus'
  assert meta['documents'] == 4000 and meta['split_method']
  start = time.perf_counter()
  assert prepare.prepare_sample(str(tmp_path)) == meta
  assert time.perf_counter() - start < 0.05


def test_worker_count_does_not_change_the_output(tmp_path):
  docs = [f'Doc {i}: ' + 'word ' * (i % 17) for i in range(3000)]
  metas = [prepare.write_dataset(docs, str(tmp_path / f'w{w}'), source='test',
                                 val_fraction=0.01, seed=5, workers=w)
           for w in (1, 2)]
  assert metas[0] == metas[1]
  for split in prepare.SPLITS:
    for name in metas[0]['splits'][split]['shards']:
      assert ((tmp_path / 'w1' / name).read_bytes() ==
              (tmp_path / 'w2' / name).read_bytes())
