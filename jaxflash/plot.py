"""Loss, learning-rate and throughput curves of a run as PNG files.

  python -m jaxflash.plot runs/tiny [--out DIR]

Reads WORKDIR/metrics.jsonl and writes loss.png (train and validation),
lr.png and throughput.png into --out (default: the workdir).
"""
import os
import sys

from absl import app
from absl import flags
# Figure without pyplot draws with the Agg canvas: no display needed.
from matplotlib.figure import Figure

from jaxflash import metrics

# File, y-axis label, and the (metrics.jsonl key, legend label) curves on it.
CHARTS = (
    ('loss.png', 'loss', (('loss', 'train'), ('eval_loss', 'validation'))),
    ('lr.png', 'learning rate', (('lr', 'learning rate'),)),
    ('throughput.png', 'tokens per second',
     (('tokens_per_sec', 'tokens/s'),)),
)


def plot(records, out_dir):
  """Writes the charts of `records` into out_dir; returns their paths."""
  paths = []
  for name, ylabel, curves in CHARTS:
    figure = Figure(figsize=(7, 4), layout='tight')
    axes = figure.add_subplot()
    for key, label in curves:
      points = [(r['step'], r[key]) for r in records if r.get(key) is not None]
      if points:
        # Evaluation is sparse: markers keep a lone point visible.
        axes.plot(*zip(*points), label=label,
                  marker='o' if key == 'eval_loss' else None)
    axes.set(xlabel='step', ylabel=ylabel)
    axes.grid(alpha=0.3)
    if len(curves) > 1:
      axes.legend()
    paths.append(os.path.join(out_dir, name))
    figure.savefig(paths[-1], dpi=120)
  return paths


def _define_flags():
  flags.DEFINE_string('out', None, 'Where the PNG files go; default: the '
                      'workdir.')


def main(argv):
  if len(argv) != 2:
    sys.exit('error: usage: python -m jaxflash.plot WORKDIR [--out DIR]')
  workdir = argv[1]
  if not os.path.isfile(os.path.join(workdir, 'metrics.jsonl')):
    sys.exit(f'error: {workdir}: no metrics.jsonl; not a training run\'s '
             'workdir, or nothing logged yet')
  out_dir = flags.FLAGS.out or workdir
  os.makedirs(out_dir, exist_ok=True)
  for path in plot(metrics.read(workdir), out_dir):
    print(path)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
