"""train.py as a user runs it: trains, logs, checkpoints, resumes, refuses."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.d_model=64', '--config.model.n_layer=2',
         '--config.batch_size=4', '--config.log_every=2',
         '--config.eval_every=4', '--config.eval_batches=2',
         '--config.checkpoint_every=4', '--config.optimizer.warmup_steps=2']


def run_train(workdir, data_dir, *args):
  cmd = [sys.executable, 'train.py', '--config', 'configs/tiny.py',
         '--workdir', str(workdir), f'--config.data.data_dir={data_dir}',
         *SMALL, *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def test_trains_then_resumes_exactly(tmp_path, data_dir):
  straight, split = tmp_path / 'straight', tmp_path / 'split'
  # A constant rate after warmup, so stopping at 4 does not change the schedule.
  flat = ('--config.optimizer.min_lr_ratio=1.0',)
  first = run_train(straight, data_dir, '--config.steps=8', *flat)
  assert first.returncode == 0, first.stderr
  records = read_metrics(straight)
  assert [r['step'] for r in records] == [1, 2, 4, 6, 8]
  assert records[0]['tokens_per_sec'] is None  # step 1 includes compiling
  for r in records[1:]:
    assert r['loss'] > 0 and r['tokens_per_sec'] > 0 and r['lr'] > 0
  assert 'eval_loss' in records[2] and 'eval_loss' in records[4]
  assert records[-1]['loss'] < records[0]['loss'] - 1.0

  part1 = run_train(split, data_dir, '--config.steps=4', *flat)
  assert part1.returncode == 0, part1.stderr
  part2 = run_train(split, data_dir, '--config.steps=8', *flat)
  assert part2.returncode == 0, part2.stderr
  assert 'resuming at step 4' in part2.stdout
  resumed = read_metrics(split)
  assert [r['step'] for r in resumed] == [1, 2, 4, 6, 8]
  # Same data order, same updates: the resumed run matches the straight one.
  for a, b in zip(records, resumed):
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-5), (a, b)
  assert sorted(os.listdir(split / 'checkpoints')) == ['4', '8']


@pytest.mark.parametrize('override,message', [
    ('--config.model.n_head=3', 'config.model.n_head: 3 does not divide'),
    ('--config.model.nheads=4', "--config.model.nheads: the config has no key"),
    ('--config.steps=ten', 'flag --config.steps=ten'),
])
def test_bad_config_is_one_clear_line(tmp_path, data_dir, override, message):
  result = run_train(tmp_path / 'w', data_dir, override)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')
