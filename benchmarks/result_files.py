"""Where the benchmarks write their JSON: runs/benchmarks/ (ignored by git)
unless --out says otherwise, and never over an existing file, so a partial
or repeated run cannot replace a table that was kept. The tables committed
in benchmarks/results/ are curated: runs merged by hand, with notes."""
import datetime
import os

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'runs', 'benchmarks')


def add_out_flag(parser):
  parser.add_argument('--out', default=DEFAULT_DIR,
                      help='directory for the JSON (default runs/benchmarks/);'
                      ' an existing file there is kept: the new one gets '
                      'the time in its name')


def new_path(out, stem):
  """out/stem.json, or out/stem_<time>.json (then _1, _2...) if that is
  taken."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f'{stem}.json')
  if not os.path.exists(path):
    return path
  stamped = f'{stem}_{datetime.datetime.now():%Y%m%d-%H%M%S}'
  path, n = os.path.join(out, f'{stamped}.json'), 0
  while os.path.exists(path):
    n += 1
    path = os.path.join(out, f'{stamped}_{n}.json')
  return path
