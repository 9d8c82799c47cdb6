"""Plain-text and JSON-lines corpora read from files matching a glob.

A `.jsonl` or `.json` file holds one JSON object a line with a "text" field,
one document each; any other file is one document. Bad input is skipped or
repaired, never dropped silently: each case is logged and counted in `stats`.
"""
import glob
import json
import logging
import os


def new_stats():
  return dict(input_files=0, unreadable_files=0, skipped_lines=0,
              replaced_decoding_documents=0)


def decode(raw, stats):
  """UTF-8 text of `raw`; undecodable bytes become U+FFFD and are counted."""
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError:
    stats['replaced_decoding_documents'] += 1
    return raw.decode('utf-8', errors='replace')


def _json_lines(path, raw, stats):
  for number, line in enumerate(raw.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(decode(line, stats))
      text = record['text']
      if not isinstance(text, str):
        raise TypeError(f'"text" is a {type(text).__name__}')
    except (ValueError, KeyError, TypeError) as e:
      logging.warning('%s:%d: skipped, not a JSON object with a "text" string '
                      '(%s)', path, number, e)
      stats['skipped_lines'] += 1
      continue
    try:
      text.encode('utf-8')
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
      stats['replaced_decoding_documents'] += 1
      text = text.encode('utf-8', errors='replace').decode('utf-8')
    yield text


def read(pattern, stats):
  """All documents of the files matching `pattern` (sorted by path), a list."""
  paths = sorted(p for p in glob.glob(pattern, recursive=True)
                 if not os.path.isdir(p))
  if not paths:
    raise FileNotFoundError(f'--input {pattern!r} matches no files')
  documents = []
  for path in paths:
    stats['input_files'] += 1
    try:
      with open(path, 'rb') as f:
        raw = f.read()
    except OSError as e:
      logging.warning('skipped unreadable file %s: %s', path, e)
      stats['unreadable_files'] += 1
      continue
    if path.endswith(('.jsonl', '.json')):
      documents.extend(_json_lines(path, raw, stats))
    else:
      documents.append(decode(raw, stats))
  return documents
