"""Faults injected into train.py runs: NaNs, SIGTERM, SIGKILL, corrupt
checkpoints, a full disk, wrong workdirs and data."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jaxflash import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config', 'configs/tiny.py', '--config.model.d_model=64',
         '--config.model.n_layer=2', '--config.batch_size=4',
         '--config.log_every=1', '--config.optimizer.warmup_steps=1',
         '--config.eval_batches=1', '--config.checkpoint_every=100']


def command(workdir, data_dir, *args):
  return [sys.executable, 'train.py', *SMALL, f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', *args]


def run(workdir, data_dir, *args):
  return subprocess.run(command(workdir, data_dir, *args), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def records(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """One sample corpus for the tests that run train.py several times."""
  return tmp_path_factory.mktemp('data')


def last_logged_step(workdir):
  """The step of metrics.jsonl's last complete record while a run writes."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.endswith('\n')]
  return json.loads(lines[-1])['step'] if lines else 0


def one_error_line(result, *expected):
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for text in expected:
    assert text in lines[0], lines[0]


def test_nonfinite_loss_stops_with_the_step(tmp_path):
  # A learning rate of 1e30 makes step 3's loss non-finite.
  result = run(tmp_path / 'w', tmp_path / 'data', '--config.steps=6',
               '--config.optimizer.learning_rate=1e30')
  one_error_line(result, 'step 3: loss nan', 'on_nan=stop')


def test_nonfinite_steps_skipped_then_stop(tmp_path):
  result = run(tmp_path / 'w', tmp_path / 'data', '--config.steps=8',
               '--config.optimizer.learning_rate=1e30',
               '--config.on_nan=skip', '--config.max_nan_skips=2')
  assert 'warning: step 3' in result.stdout
  assert 'warning: step 4' in result.stdout
  one_error_line(result, 'step 5:', 'on_nan=skip, 3 in a row')
  counts = {r['step']: r['nonfinite_steps'] for r in records(tmp_path / 'w')}
  assert counts == {1: 0, 2: 0, 3: 1, 4: 2}


def test_sigterm_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / 'w'
  proc = subprocess.Popen(
      command(workdir, tmp_path / 'data', '--config.steps=500'), cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(records(workdir)) < 3:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  stopped = records(workdir)[-1]['step']
  assert f'stopped at step {stopped}' in out or (
      f'stopped at step {stopped + 1}' in out), out
  step = int(out.split('stopped at step ')[1].split()[0])
  assert os.listdir(workdir / 'checkpoints') == [str(step)]
  resumed = run(workdir, tmp_path / 'data', f'--config.steps={step + 2}')
  assert resumed.returncode == 0, resumed.stderr
  assert f'resuming at step {step}' in resumed.stdout


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
  assert run(tmp_path / 'w', tmp_path / 'data',
             '--config.steps=2').returncode == 0
  result = run(tmp_path / 'w', tmp_path / 'data', '--config.steps=4',
               '--config.model.d_model=96')
  one_error_line(result, 'config.model:', 'd_model 64 there, 96 here')


def test_unusable_workdir_is_refused(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = run(blocker / 'w', tmp_path / 'data', '--config.steps=2')
  one_error_line(result, f'--workdir {blocker / "w"}: cannot create it')


def test_sigkill_then_rerun_gives_the_same_losses(tmp_path, data):
  args = ('--config.steps=12', '--config.checkpoint_every=3')
  straight = run(tmp_path / 'straight', data, *args)
  assert straight.returncode == 0, straight.stderr
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(command(workdir, data, *args), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  # Killed at whatever point it reached after checkpoint 3: mid-step, mid-save.
  deadline = time.time() + 300
  while time.time() < deadline and not (
      os.path.isdir(workdir / 'checkpoints' / '3')
      and last_logged_step(workdir) >= 4):
    time.sleep(0.02)
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = last_logged_step(workdir)
  assert killed_at < 12
  resumed = run(workdir, data, *args)
  assert resumed.returncode == 0, resumed.stderr
  start = int(resumed.stdout.split('resuming at step ')[1].split()[0])
  assert start <= killed_at and start % 3 == 0
  # metrics.jsonl lost the records past the checkpoint; one record a step.
  expected = records(tmp_path / 'straight')
  got = records(workdir)
  assert [r['step'] for r in got] == list(range(1, 13))
  for a, b in zip(expected, got):  # bitwise: same data, RNG and updates
    assert (a['loss'], a['grad_norm']) == (b['loss'], b['grad_norm']), a['step']
  assert expected[-1]['eval_loss'] == got[-1]['eval_loss']


def test_unreadable_checkpoints_are_passed_over(tmp_path, data):
  workdir = tmp_path / 'w'
  args = ('--config.steps=6', '--config.checkpoint_every=2')
  first = run(workdir, data, *args)
  assert first.returncode == 0, first.stderr
  before = records(workdir)
  ckpts = workdir / 'checkpoints'
  # Checkpoint 6's largest state file cut short, 4's data position deleted.
  biggest = max(glob.glob(f'{ckpts}/6/state/**/d/*', recursive=True),
                key=os.path.getsize)
  os.truncate(biggest, 1000)
  os.remove(ckpts / '4' / 'data' / 'process_0-of-1.json')
  second = run(workdir, data, *args)
  assert second.returncode == 0, second.stderr
  warnings = second.stdout.splitlines()[:2]
  for step, cause in ((6, 'is not valid for value of size 1000'),
                      (4, 'process_0-of-1.json does not exist')):
    line = next(w for w in warnings if f'checkpoint {step} in' in w)
    assert line.startswith('warning: ') and cause in line, line
    assert line.endswith('; resuming from checkpoint 2'), line
  assert 'resuming at step 2' in second.stdout
  names = sorted(os.listdir(ckpts))  # 4.unreadable-TIME, ...
  assert [n.split('-')[0] for n in names] == [
      '2', '4', '4.unreadable', '6', '6.unreadable']
  # From checkpoint 2 the run retraced the same steps.
  assert [(r['step'], r['loss']) for r in records(workdir)] == [
      (r['step'], r['loss']) for r in before]

  # None readable: stop, naming them, and leave them as they are.
  for path in glob.glob(f'{ckpts}/[0-9]/data/*.json'):
    os.truncate(path, 3)
  third = run(workdir, data, '--config.steps=8')
  one_error_line(third, f'no checkpoint in {ckpts} can be read (tried 6, 4, '
                 '2; checkpoint 6: JSONDecodeError', 'nothing was changed')
  assert sorted(os.listdir(ckpts)) == names


def test_nonfinite_checkpoint_is_passed_over(tmp_path, capsys):
  # Training skips non-finite steps, so such values mean a corrupt file.
  manager = checkpoint.make_manager(
      tmp_path, ml_collections.ConfigDict(dict(keep_checkpoints=3)))
  positions = iter(grain.MapDataset.range(10).to_iter_dataset())
  for step, value in ((1, 1.0), (2, float('nan'))):
    next(positions)
    checkpoint.save(manager, step, dict(w=jnp.full(4, value)), positions)
  checkpoint.wait(manager)
  abstract = dict(w=jax.ShapeDtypeStruct(
      (4,), jnp.float32,
      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  state = checkpoint.restore_latest(manager, abstract, positions)
  assert float(state['w'][0]) == 1.0 and next(positions) == 1
  assert 'checkpoint 2 in' in capsys.readouterr().out
  assert manager.all_steps() == [1]
  manager.close()


def test_failed_save_keeps_the_last_checkpoint(tmp_path, data):
  workdir = tmp_path / 'w'
  args = ('--config.keep_checkpoints=1', '--config.checkpoint_every=2')
  first = run(workdir, data, '--config.steps=2', *args)
  assert first.returncode == 0, first.stderr
  # A full disk: no file may grow past 1 MiB (the checkpoint's are ~12 MiB);
  # Python ignores SIGXFSZ, so writes fail with EFBIG.
  full = subprocess.run(
      ['bash', '-c', 'ulimit -f 1024 && exec "$@"', 'bash',
       *command(workdir, data, '--config.steps=4', *args)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  one_error_line(full, f'checkpoint 4 could not be written to '
                 f'{workdir / "checkpoints"}', 'File too large',
                 'checkpoint 2 is intact')
  assert '2' in os.listdir(workdir / 'checkpoints')
  again = run(workdir, data, '--config.steps=4', *args)
  assert again.returncode == 0, again.stderr
  assert 'resuming at step 2' in again.stdout
  assert os.listdir(workdir / 'checkpoints') == ['4']  # leftovers removed
  # steps below the checkpoint's: said, and nothing trained or lost.
  fewer = run(workdir, data, '--config.steps=2', *args)
  assert fewer.returncode == 0, fewer.stderr
  assert ('the latest checkpoint is at step 4, steps is 2: nothing to train'
          in fewer.stdout)
  assert 'step 3 |' not in fewer.stdout
  assert os.listdir(workdir / 'checkpoints') == ['4']


def test_unprepared_dataset_is_one_line(tmp_path):
  (tmp_path / 'data' / 'openwebtext').mkdir(parents=True)
  result = run(tmp_path / 'w', tmp_path / 'data',
               '--config.data.dataset=openwebtext')
  one_error_line(result, 'config.data.dataset: no prepared dataset at',
                 'python -m jaxflash.data.prepare --dataset openwebtext '
                 '--manual_dir DIR')
  # A dataset of the user's own is prepared from text (prepare's --dataset
  # takes sample, openwebtext or text).
  result = run(tmp_path / 'w', tmp_path / 'data',
               '--config.data.dataset=mine')
  one_error_line(result, 'python -m jaxflash.data.prepare --dataset text '
                 '--input GLOB --name mine')
