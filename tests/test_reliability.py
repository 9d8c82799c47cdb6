"""Faults injected into train.py runs: NaNs, SIGTERM, wrong workdirs."""
import json
import os
import signal
import subprocess
import sys
import time

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
