"""OpenWebText as a TFDS dataset, built from a manual download, no TensorFlow.

The manual directory (searched recursively) holds one of the published layouts:
  openwebtext.tar.xz        the original release: openwebtext/*_data.xz
  urlsf_subsetNN.tar        the Hugging Face copy's subsets/, of *_data.xz
  urlsf_subsetNN-M_data.xz  either of them extracted
  *.parquet                 Hugging Face parquet shards with a `text` column
Every *_data.xz is an xz-compressed tar of .txt files, one document each. Text
is normalised as the reference loader does: runs of three or more newlines
become two, and the document is stripped. Empty documents are kept (the
tokenizer skips and counts them), so the document count is the reference's.

The dataset is one 'train' split of {'text': str} in ArrayRecord files. TFDS
orders examples by a hash of their key (the *_data.xz member and .txt names),
so the order is the same whichever of the three xz layouts the corpus came
from (parquet rows are keyed by file and row). Bad input is skipped with a
warning and counted in `builder.info.metadata`: corrupt *_data.xz members
(`skipped_members`), unreadable files (`unreadable_files`), undecodable bytes
(`replaced_decoding_documents`, decoded with U+FFFD instead).
"""
import io
import logging
import lzma
import os
import re
import tarfile

from etils import epath
import tensorflow_datasets as tfds

from jaxflash.data import parallel
from jaxflash.data import text_corpus

HOMEPAGE = 'https://skylion007.github.io/OpenWebTextCorpus/'
MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download OpenWebText ({HOMEPAGE}) on a machine with internet access and put it
in the manual directory, in one of these layouts:
  * openwebtext.tar.xz, the original release (12 GB); or
  * subsets/urlsf_subset00.tar ... urlsf_subset20.tar, the Hugging Face copy
    (https://huggingface.co/datasets/Skylion007/openwebtext); or
  * either one extracted: a folder of urlsf_subsetNN-M_data.xz files; or
  * Hugging Face parquet shards: *.parquet files with a `text` column.
Then run: python -m jaxflash.data.prepare --dataset openwebtext \\
  --manual_dir MANUAL_DIR --data_dir DATA_DIR"""

_DATA_XZ = re.compile(r'urlsf_subset\d+-\d+_data\.xz')
# File name patterns of the layouts, in the order they are reported.
_LAYOUTS = {
    'archive': re.compile(r'openwebtext\.tar\.xz'),
    'subsets': re.compile(r'urlsf_subset\d+\.tar'),
    'extracted': _DATA_XZ,
    'parquet': re.compile(r'.+\.parquet'),
}
_BLANK_LINES = re.compile(r'\n{3,}')
_MEMBER_ERRORS = (OSError, EOFError, lzma.LZMAError, tarfile.TarError)


def normalize(text):
  return _BLANK_LINES.sub('\n\n', text).strip()


def find_inputs(manual_dir):
  """(layout, sorted paths) of the corpus files under manual_dir."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f'OpenWebText manual directory {manual_dir!r} does not exist.\n'
        f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
  found = {layout: [] for layout in _LAYOUTS}
  for root, dirs, files in os.walk(manual_dir):
    dirs.sort()
    for name in sorted(files):
      for layout, pattern in _LAYOUTS.items():
        if pattern.fullmatch(name):
          found[layout].append(os.path.join(root, name))
          break
  layouts = [layout for layout, paths in found.items() if paths]
  if not layouts:
    raise FileNotFoundError(
        f'no OpenWebText files in {manual_dir}.\n'
        f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
  if len(layouts) > 1:
    # Reading both would duplicate documents; guessing could lose some.
    examples = ', '.join(found[layout][0] for layout in layouts)
    raise ValueError(
        f'{manual_dir} holds more than one OpenWebText layout ({examples}); '
        'keep one, or point --manual_dir at a folder holding only one')
  return layouts[0], found[layouts[0]]


def new_stats():
  return dict(layout=None, input_files=0, members=0, skipped_members=0,
              unreadable_files=0, ignored_files=0,
              replaced_decoding_documents=0)


def _data_xz_members(layout, paths, stats):
  """Yields (name, compressed bytes) of every *_data.xz, streaming archives."""
  for path in paths:
    stats['input_files'] += 1
    try:
      if layout == 'extracted':
        with open(path, 'rb') as f:
          payload = f.read()
        yield os.path.basename(path), payload
        continue
      with tarfile.open(path, mode='r|*') as tar:
        for member in tar:
          name = os.path.basename(member.name)
          if member.isfile() and _DATA_XZ.fullmatch(name):
            yield name, tar.extractfile(member).read()
          elif member.isfile():
            logging.warning('ignored %s in %s: not a *_data.xz member',
                            member.name, path)
            stats['ignored_files'] += 1
    except _MEMBER_ERRORS as e:
      logging.warning('skipped unreadable file %s (members after the error '
                      'are lost): %s', path, e)
      stats['unreadable_files'] += 1


def _decode_member(item):
  """(name, [(key, text)], replaced, error) of one *_data.xz member.

  The member is decompressed and parsed whole before any document is used,
  so a corrupt member is skipped entirely rather than cut short.
  """
  name, payload = item
  try:
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(payload))) as tar:
      files = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
  except _MEMBER_ERRORS as e:
    return name, [], 0, f'{type(e).__name__}: {e}'
  stats = text_corpus.new_stats()
  stem = name.removesuffix('.xz')
  documents = [(f'{stem}/{member}', normalize(text_corpus.decode(raw, stats)))
               for member, raw in files]
  return name, documents, stats['replaced_decoding_documents'], None


def _parquet_documents(manual_dir, paths, stats):
  import pyarrow  # pylint: disable=g-import-not-at-top
  from pyarrow import parquet  # pylint: disable=g-import-not-at-top
  for path in paths:
    stats['input_files'] += 1
    name = os.path.relpath(path, manual_dir)
    row = 0
    try:
      file = parquet.ParquetFile(path)
      if 'text' not in file.schema_arrow.names:
        raise ValueError(f'{path} has no "text" column (it has '
                         f'{file.schema_arrow.names}); expected OpenWebText '
                         'parquet shards')
      for batch in file.iter_batches(columns=['text']):
        for text in batch.column(0).to_pylist():
          yield f'{name}/{row}', normalize(text or '')
          row += 1
    except (OSError, pyarrow.ArrowException) as e:
      logging.warning('skipped unreadable file %s after %d rows: %s', path,
                      row, e)
      stats['unreadable_files'] += 1


def read_documents(manual_dir, stats, workers=1):
  """Yields (key, text) of every document under manual_dir; fills `stats`.

  workers > 1 decompresses *_data.xz members in that many processes.
  """
  layout, paths = find_inputs(manual_dir)
  stats['layout'] = layout
  if layout == 'parquet':
    yield from _parquet_documents(manual_dir, paths, stats)
    return
  members = _data_xz_members(layout, paths, stats)
  for name, documents, replaced, error in parallel.ordered_map(
      _decode_member, members, workers):
    stats['members'] += 1
    if error:
      logging.warning('skipped corrupt member %s: %s', name, error)
      stats['skipped_members'] += 1
      continue
    stats['replaced_decoding_documents'] += replaced
    yield from documents


class Openwebtext(tfds.core.GeneratorBasedBuilder):
  """OpenWebText documents {'text': str} in one 'train' split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'jaxflash reader of the manual download.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # TFDS derives this from the package, which for a namespace package such as
  # jaxflash needs the uninstalled importlib_resources.
  code_path = epath.Path(__file__)

  def __init__(self, *, workers=1, **kwargs):
    self._workers = workers
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='OpenWebText: web pages linked from Reddit (Gokaslan and '
        'Cohen, 2019), an open replication of WebText.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage=HOMEPAGE,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir):
    stats = new_stats()
    for key, text in read_documents(manual_dir, stats, self._workers):
      yield key, {'text': text}
    # Saved with the dataset (metadata.json) once generation completes.
    self.info.metadata.update(stats)


def build(data_dir, manual_dir=None, workers=1):
  """The prepared builder under data_dir, generating it if it is not there."""
  builder = Openwebtext(data_dir=data_dir, file_format='array_record',
                        workers=workers)
  if not builder.is_prepared():
    if not manual_dir:
      raise FileNotFoundError(
          f'OpenWebText is not built under {data_dir} and no manual directory '
          f'(--manual_dir) was given.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    find_inputs(manual_dir)  # our error messages, before TFDS's
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, 'downloads'),
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
  return builder


class Texts:
  """The documents of a prepared builder as a picklable sequence of str."""

  def __init__(self, builder):
    self._source = builder.as_data_source(split='train')

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      records = self._source.__getitems__(range(len(self))[index])
      return [r['text'].decode('utf-8') for r in records]
    return self._source[index]['text'].decode('utf-8')
