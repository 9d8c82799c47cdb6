"""train.py over two processes (jax.distributed, gloo on CPU) vs one process."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config', 'configs/tiny.py', '--config.model.d_model=64',
         '--config.model.n_layer=2', '--config.batch_size=4',
         '--config.log_every=2', '--config.optimizer.warmup_steps=2',
         '--config.optimizer.min_lr_ratio=1.0', '--config.eval_every=2',
         '--config.eval_batches=1', '--config.checkpoint_every=4']


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir, data_dir, steps, num_processes, devices_per_process):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process))
  args = [sys.executable, 'train.py', *SMALL, f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', f'--config.steps={steps}']
  if num_processes > 1:
    port = free_port()
    args += [f'--coordinator_address=localhost:{port}',
             f'--num_processes={num_processes}']
  procs = [subprocess.Popen(
      args + ([f'--process_id={i}'] if num_processes > 1 else []), cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss'], r.get('eval_loss'))
            for r in map(json.loads, f)]


def test_two_processes_match_one_and_resume(tmp_path):
  data = tmp_path / 'data'
  launch(tmp_path / 'one', data, 8, num_processes=1, devices_per_process=2)
  outs = launch(tmp_path / 'two', data, 4, num_processes=2,
                devices_per_process=1)
  assert 'step 4' in outs[0] and 'step' not in outs[1]  # only process 0 logs
  outs = launch(tmp_path / 'two', data, 8, num_processes=2,
                devices_per_process=1)
  assert 'resuming at step 4' in outs[0]
  one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert [s for s, _, _ in two] == [s for s, _, _ in one] == [1, 2, 4, 6, 8]
  for (_, a, ea), (_, b, eb) in zip(one, two):
    assert a == pytest.approx(b, rel=1e-5)
    assert (ea is None and eb is None) or ea == pytest.approx(eb, rel=1e-5)
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['4', '8']


@pytest.mark.parametrize('flags,message', [
    (['--coordinator_address=localhost:1'], 'go together'),
    (['--coordinator_address=localhost:1', '--num_processes=2',
      '--process_id=2'], '--process_id 2 is not in'),
])
def test_bad_launch_flags(tmp_path, flags, message):
  result = subprocess.run(
      [sys.executable, 'train.py', *SMALL, f'--workdir={tmp_path}', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr
