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
  return run_together(
      [args + ([f'--process_id={i}'] if num_processes > 1 else [])
       for i in range(num_processes)], env)


def run_together(commands, env, timeout=600):
  """Runs the commands at once; their stdouts, once all have succeeded."""
  procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for command in commands]
  outputs = [p.communicate(timeout=timeout) for p in procs]
  failed = [f'process {i} (exit {p.returncode}):\n{err[-3000:]}'
            for i, (p, (_, err)) in enumerate(zip(procs, outputs))
            if p.returncode != 0]
  assert not failed, '\n'.join(failed)
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


_WAIT_FOR_SLOW_PROCESS_0 = '''
import sys, time
import numpy as np
from jax.experimental import multihost_utils
from jaxflash import distributed
pid = int(sys.argv[2])
distributed.initialize(sys.argv[1], 2, pid)
if pid == 0:
  time.sleep(40)  # longer than gloo's 30 s wait for a collective's peers
distributed.wait_for_all('process 0 is done')
print(multihost_utils.process_allgather(np.int32(pid)).tolist())
'''


def test_wait_for_all_outlasts_a_slow_process_0():
  """Process 0 working alone for 40 s (preparing the sample data, say) must
  not fail the others: with sync_global_devices they did, its gloo
  collective giving up after 30 s."""
  address = f'localhost:{free_port()}'
  outs = run_together(
      [[sys.executable, '-c', _WAIT_FOR_SLOW_PROCESS_0, address, str(i)]
       for i in range(2)], dict(os.environ, JAX_NUM_CPU_DEVICES='1'))
  assert [out.splitlines()[-1] for out in outs] == ['[0, 1]'] * 2
