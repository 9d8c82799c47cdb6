"""OpenWebText: a fake release in the published layouts -> TFDS -> tokens."""
import io
import json
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest

from jaxflash.data import loader
from jaxflash.data import openwebtext
from jaxflash.data import prepare
from jaxflash.data import text_corpus
from jaxflash.data import tokenizer

SUBSETS, PARTS, DOCS = 3, 4, 25  # 300 documents, one member corrupt
CORRUPT = 'urlsf_subset01-2_data.xz'


def _document(subset, part, i):
  """Raw bytes of one document: mostly prose, with the awkward cases."""
  if (subset, part, i) == (0, 0, 3):
    return b''
  if (subset, part, i) == (0, 1, 4):
    return b'\n\n \n'  # empty once stripped
  if (subset, part, i) == (2, 3, 5):
    return b'Caf\xe9 au lait \xff costs two euros.'  # Latin-1, not UTF-8
  text = f'Story {subset}-{part}-{i}.\n\n\n\nIt has {i} words about w{i * 7}.'
  return (text + ' The end.\n' * (i % 3)).encode()


def _data_xz(subset, part):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:xz') as tar:
    for i in range(DOCS):
      raw = _document(subset, part, i)
      info = tarfile.TarInfo(f'{subset:02d}{part:02d}{i:03d}-{i * 31:08x}.txt')
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return buffer.getvalue()


def _members():
  """(name, bytes) of every *_data.xz of the fake release."""
  for subset in range(SUBSETS):
    for part in range(PARTS):
      name = f'urlsf_subset{subset:02d}-{part}_data.xz'
      data = _data_xz(subset, part)
      if name == CORRUPT:
        data = data[:len(data) // 2]  # a truncated download
      yield name, data


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def expected_documents():
  """What the reference loader yields: normalised text of good members."""
  docs = []
  for subset in range(SUBSETS):
    for part in range(PARTS):
      if f'urlsf_subset{subset:02d}-{part}_data.xz' == CORRUPT:
        continue
      for i in range(DOCS):
        raw = _document(subset, part, i)
        docs.append(openwebtext.normalize(raw.decode('utf-8', 'replace')))
  return docs


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """The fake corpus in each published layout, a folder each."""
  root = tmp_path_factory.mktemp('owt')
  members = list(_members())
  # Hugging Face: subsets/urlsf_subsetNN.tar of *_data.xz.
  (root / 'hf' / 'subsets').mkdir(parents=True)
  for subset in range(SUBSETS):
    with tarfile.open(root / 'hf' / 'subsets' / f'urlsf_subset{subset:02d}.tar',
                      'w') as tar:
      for name, data in members:
        if name.startswith(f'urlsf_subset{subset:02d}-'):
          _add(tar, f'openwebtext/{name}', data)
  # The original openwebtext.tar.xz, and the same extracted.
  (root / 'original').mkdir()
  with tarfile.open(root / 'original' / 'openwebtext.tar.xz', 'w:xz') as tar:
    for name, data in reversed(members):  # order must not matter
      _add(tar, f'openwebtext/{name}', data)
  (root / 'extracted' / 'openwebtext').mkdir(parents=True)
  for name, data in members:
    (root / 'extracted' / 'openwebtext' / name).write_bytes(data)
  return root


@pytest.fixture(scope='module')
def prepared(release, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('data')
  meta = prepare.prepare_openwebtext(str(data_dir), str(release / 'hf'),
                                     workers=2)
  return data_dir, meta


def _texts(data_dir):
  return openwebtext.Texts(openwebtext.build(str(data_dir / 'tfds')))


def test_counts_match_tokenizing_the_documents(prepared):
  data_dir, meta = prepared
  docs = expected_documents()
  assert meta['documents'] == len(docs) == 275
  assert meta['empty_documents'] == 2
  expected = sum(len(tokenizer.encode_document(d)) for d in docs)
  splits = meta['splits']
  assert splits['train']['tokens'] + splits['validation']['tokens'] == expected
  assert splits['train']['documents'] + splits['validation']['documents'] == 273
  stats = meta['source_stats']
  assert stats['layout'] == 'subsets' and stats['input_files'] == 3
  assert stats['members'] == 12 and stats['skipped_members'] == 1
  assert stats['replaced_decoding_documents'] == 1
  assert stats['unreadable_files'] == 0 and stats['ignored_files'] == 0
  assert meta['split_seed'] == 2357 and meta['val_fraction'] == 0.0005
  assert sorted(_texts(data_dir)[:]) == sorted(docs)
  meta_json = (data_dir / 'openwebtext' / 'meta.json').read_text()
  assert json.loads(meta_json) == meta
  assert 'tensorflow' not in sys.modules


def test_validation_split_is_the_documented_permutation(prepared):
  data_dir, meta = prepared
  texts = _texts(data_dir)
  chosen = np.random.default_rng(2357).permutation(len(texts))[:1]
  expected = tokenizer.encode_document(texts[int(chosen[0])])
  shard = meta['splits']['validation']['shards'][0]
  np.testing.assert_array_equal(
      np.fromfile(data_dir / 'openwebtext' / shard, dtype=np.uint16), expected)
  assert meta['splits']['validation']['documents'] == 1


def test_workers_do_not_change_the_shards(prepared, tmp_path):
  data_dir, meta = prepared
  again = prepare.write_dataset(
      _texts(data_dir), str(tmp_path / 'one'), source=meta['source'],
      val_fraction=meta['val_fraction'], seed=meta['split_seed'], workers=1)
  for split in prepare.SPLITS:
    for name in again['splits'][split]['shards']:
      assert ((tmp_path / 'one' / name).read_bytes() ==
              (data_dir / 'openwebtext' / name).read_bytes())


@pytest.mark.parametrize('layout', ['original', 'extracted'])
def test_every_layout_gives_the_same_dataset(release, prepared, tmp_path,
                                             layout):
  builder = openwebtext.build(str(tmp_path), str(release / layout))
  assert builder.info.metadata['skipped_members'] == 1
  assert openwebtext.Texts(builder)[:] == _texts(prepared[0])[:]


def test_parquet_shards(prepared, tmp_path):
  pq = pytest.importorskip('pyarrow.parquet')
  import pyarrow  # pylint: disable=g-import-not-at-top
  docs = expected_documents()
  (tmp_path / 'manual').mkdir()
  for i, part in enumerate((docs[:100], docs[100:])):
    pq.write_table(pyarrow.table({'text': part}),
                   tmp_path / 'manual' / f'train-{i:05d}-of-00002.parquet')
  builder = openwebtext.build(str(tmp_path / 'tfds'), str(tmp_path / 'manual'))
  assert sorted(openwebtext.Texts(builder)[:]) == sorted(docs)
  assert builder.info.metadata['layout'] == 'parquet'


def test_unreadable_file_is_skipped_and_counted(release, tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  for name in ('urlsf_subset00-0_data.xz', 'urlsf_subset00-1_data.xz'):
    (manual / name).write_bytes((release / 'extracted' / 'openwebtext' /
                                 name).read_bytes())
  (manual / 'urlsf_subset00-2_data.xz').symlink_to(tmp_path / 'gone')
  stats = openwebtext.new_stats()
  docs = list(openwebtext.read_documents(str(manual), stats))
  assert len(docs) == 2 * DOCS
  assert stats['unreadable_files'] == 1 and stats['input_files'] == 3


def test_loader_reads_the_prepared_corpus(prepared):
  data_dir, meta = prepared
  c = ml_collections.ConfigDict(dict(seed=0, batch_size=4, eval_batches=1))
  c.data = ml_collections.ConfigDict(dict(
      data_dir=str(data_dir), dataset='openwebtext', seq_len=16, prefetch=1))
  batch = next(iter(loader.train_dataset(c)))
  assert batch.shape == (4, 17) and batch.max() <= tokenizer.EOS_ID
  source = loader.windows(str(data_dir), 'openwebtext', 'train', 16)
  assert len(source) == (meta['splits']['train']['tokens'] - 1) // 16


def test_rerun_reuses_and_refuses(prepared, release):
  data_dir, meta = prepared
  # Reused without reading the manual directory again.
  assert prepare.prepare_openwebtext(str(data_dir), None) == meta
  path = data_dir / 'openwebtext' / 'meta.json'
  path.write_text(json.dumps(dict(meta, split_seed=1)))
  try:
    with pytest.raises(ValueError, match='other settings'):
      prepare.prepare_openwebtext(str(data_dir), str(release / 'hf'))
  finally:
    path.write_text(json.dumps(meta))


def test_bad_manual_dirs_say_what_to_do(release, tmp_path):
  with pytest.raises(FileNotFoundError, match='openwebtext.tar.xz'):
    prepare.prepare_openwebtext(str(tmp_path), str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='no manual directory'):
    prepare.prepare_openwebtext(str(tmp_path), None)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no OpenWebText files'):
    openwebtext.find_inputs(str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match='more than one OpenWebText layout'):
    openwebtext.find_inputs(str(release))
  assert not (tmp_path / 'openwebtext').exists()


def test_text_corpus_counts_bad_input(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'plain \xff text')
  (tmp_path / 'b.jsonl').write_text(
      '{"text": "one"}\nnot json\n\n{"text": "bad \\ud800 escape"}\n'
      '{"body": "no text"}\n')
  stats = text_corpus.new_stats()
  docs = text_corpus.read(str(tmp_path / '*'), stats)
  assert docs == ['plain \ufffd text', 'one', 'bad ? escape']
  assert stats == dict(input_files=2, unreadable_files=0, skipped_lines=2,
                       replaced_decoding_documents=2)
  with pytest.raises(FileNotFoundError, match='matches no files'):
    text_corpus.read(str(tmp_path / '*.none'), stats)


def _cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'jaxflash.data.prepare', *args],
      capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_prepares_text_and_rejects_bad_options(tmp_path):
  docs = [f'Document {i} of the text corpus.' for i in range(40)]
  (tmp_path / 'corpus.jsonl').write_text(
      ''.join(json.dumps({'text': d}) + '\n' for d in docs))
  run = _cli('--dataset', 'text', '--input', str(tmp_path / '*.jsonl'),
             '--name', 'mine', '--val_fraction', '0.1',
             '--data_dir', str(tmp_path / 'data'), '--workers', '2')
  assert run.returncode == 0, run.stderr
  meta = prepare.read_meta(str(tmp_path / 'data'), 'mine')
  assert meta['splits']['validation']['documents'] == 4
  assert meta['splits']['train']['tokens'] + meta['splits']['validation'][
      'tokens'] == sum(len(tokenizer.encode_document(d)) for d in docs)
  run = _cli('--dataset', 'text', '--data_dir', str(tmp_path))
  assert run.returncode != 0 and '--input' in run.stderr
  run = _cli('--dataset', 'sample', '--manual_dir', str(tmp_path))
  assert run.returncode != 0 and '--manual_dir is only for' in run.stderr
  # Bad input found while preparing: one error line, no traceback.
  run = _cli('--dataset', 'text', '--input', str(tmp_path / '*.none'),
             '--data_dir', str(tmp_path / 'data'))
  assert run.returncode == 1
  assert run.stderr.strip().splitlines() == [
      f"error: --input '{tmp_path / '*.none'}' matches no files"]
