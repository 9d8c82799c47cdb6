"""The tools around training, as a user runs them on a short run: progress
bar, TensorBoard events, profile trace, plots, evaluation, sampling."""
import fcntl
import functools
import gzip
import importlib.util
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import jax
import jax.numpy as jnp
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from jaxflash import config as config_lib
from jaxflash import progress
from test_reliability import one_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config.model.d_model=64', '--config.model.n_layer=2',
         '--config.batch_size=4', '--config.log_every=1', '--config.steps=4',
         '--config.eval_every=2', '--config.eval_batches=2',
         '--config.optimizer.warmup_steps=1']


def python(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def run_on_terminal(cmd):
  """Runs cmd with stderr on a pseudo-terminal; returns (rc, stdout, the
  terminal's text)."""
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 120, 0, 0))
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=follower, text=True)
  os.close(follower)
  terminal = []

  def drain():  # a full terminal buffer would block the run
    while True:
      try:
        chunk = os.read(leader, 4096)
      except OSError:  # the run closed the terminal
        return
      if not chunk:
        return
      terminal.append(chunk)

  reader = threading.Thread(target=drain)
  reader.start()
  stdout, _ = proc.communicate(timeout=300)
  reader.join(timeout=10)
  os.close(leader)
  return proc.returncode, stdout, b''.join(terminal).decode(errors='replace')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 4-step run traced at steps 2..3, its stderr on a terminal."""
  workdir = tmp_path_factory.mktemp('run')
  data_dir = tmp_path_factory.mktemp('data')
  rc, stdout, terminal = run_on_terminal(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *SMALL,
       '--config.profile_steps=2:3'])
  assert rc == 0, terminal
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  return dict(workdir=workdir, stdout=stdout, terminal=terminal,
              records=records)


def test_progress_bar_on_a_terminal_leaves_log_lines_whole(run):
  assert 'step 4/4' in run['terminal'] and 'tok/s' in run['terminal']
  assert '2.05k/2.05k' in run['terminal']  # 4 steps x 4 x 128 tokens
  lines = run['stdout'].splitlines()
  assert [line.split(' | ')[0] for line in lines[1:]] == [
      f'step {i}' for i in range(1, 5)]


def test_prepare_shows_progress_only_on_a_terminal(tmp_path):
  prepare = [sys.executable, '-m', 'jaxflash.data.prepare', '--dataset',
             'sample', '--workers=1']
  rc, stdout, terminal = run_on_terminal(
      [*prepare, f'--data_dir={tmp_path / "a"}'])
  assert rc == 0, terminal
  assert 'tokenizing' in terminal and '4.00k/4.00k' in terminal, terminal
  assert 'tokens' in terminal and 'tok/s' in terminal
  assert stdout.startswith('train: ')
  piped = python(*prepare[1:], f'--data_dir={tmp_path / "b"}')
  assert piped.returncode == 0 and not piped.stderr, piped.stderr


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_only_on_a_terminal_and_process_0(monkeypatch):
  shown = lambda out: (progress.TrainProgress(1, 4, 512, out).update(2),
                       out.getvalue())[1]
  assert 'step 2/4' in shown(_Terminal())
  assert not shown(io.StringIO())
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert not shown(_Terminal())


def test_tensorboard_scalars_match_metrics_jsonl(run):
  events = event_accumulator.EventAccumulator(str(run['workdir']))
  events.Reload()
  for key in ('loss', 'lr', 'grad_norm', 'eval_loss', 'tokens_per_sec'):
    logged = {r['step']: r[key] for r in run['records']
              if r.get(key) is not None}
    scalars = {e.step: e.value for e in events.Scalars(key)}
    assert scalars == pytest.approx(logged, rel=1e-6), key
  assert set(logged) == {2, 3, 4}


def test_profile_steps_leave_a_trace(run):
  traces = [name for _, _, names in os.walk(run['workdir'] / 'profile')
            for name in names if name.endswith('.xplane.pb')]
  assert len(traces) == 1


@pytest.mark.parametrize('spec', ['3', '0:2', '3:2', 'a:b', '2:'])
def test_bad_profile_steps_is_refused(spec):
  config = config_lib.default_config()
  config.profile_steps = spec
  with pytest.raises(config_lib.ConfigError, match='config.profile_steps'):
    config_lib.validate(config, 1)


def test_plot_writes_png_charts(run):
  out = run['workdir'] / 'charts'
  result = python('-m', 'jaxflash.plot', str(run['workdir']), '--out',
                  str(out))
  assert result.returncode == 0, result.stderr
  for name in ('loss.png', 'lr.png', 'throughput.png'):
    with Image.open(out / name) as image:
      assert image.format == 'PNG' and image.size[0] > 100
      image.verify()


def test_evaluate_reproduces_the_runs_eval_loss(run):
  result = python('-m', 'jaxflash.evaluate', '--workdir', str(run['workdir']))
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('step 4 | validation loss '), result.stdout
  loss = float(result.stdout.split('validation loss ')[1].split()[0])
  assert loss == pytest.approx(run['records'][-1]['eval_loss'], abs=1e-4)
  assert 'perplexity' in result.stdout


def test_generate_continues_the_prompt(run):
  result = python('-m', 'jaxflash.generate', '--workdir', str(run['workdir']),
                  '--prompt', 'Maya and the', '--max_new_tokens', '8',
                  '--top_k', '20')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('Maya and the')
  assert len(result.stdout.strip()) > len('Maya and the')


def test_generate_refuses_a_prompt_longer_than_the_model(run):
  result = python('-m', 'jaxflash.generate', '--workdir', str(run['workdir']),
                  '--prompt', ' word' * 200)
  one_error_line(result, '--prompt: 200 tokens', 'max_seq_len=128')


def test_trace_summary_measures_hidden_collectives(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                  'benchmarks'))
  import trace_summary  # pylint: disable=g-import-not-at-top
  meta = lambda kind, pid, tid, name: dict(ph='M', name=kind, pid=pid, tid=tid,
                                           args=dict(name=name))
  kernel = lambda tid, name, ts, dur: dict(ph='X', pid=1, tid=tid, name=name,
                                           ts=ts, dur=dur)
  events = [meta('process_name', 1, 0, '/device:GPU:0'),
            meta('thread_name', 1, 7, 'Stream #7'),
            meta('thread_name', 1, 9, 'Stream #9'),
            kernel(7, 'flash_fwd.1', 0, 100), kernel(7, 'flash_fwd.2', 300, 100),
            kernel(9, 'ncclDevKernel_SendRecv', 50, 100),
            kernel(9, 'ncclDevKernel_SendRecv', 380, 40)]
  path = tmp_path / 'plugins' / 'profile' / 'run' / 'perfetto_trace.json.gz'
  path.parent.mkdir(parents=True)
  with gzip.open(path, 'wt') as f:
    json.dump(dict(traceEvents=events), f)
  # 140 us of transfers, 50 + 20 of them while a kernel computed.
  assert trace_summary.overlap(str(tmp_path)) == [
      (1, pytest.approx(0.14), pytest.approx(0.07), pytest.approx(0.2))]
  assert trace_summary.summarize(str(tmp_path))[0][:2] == (
      'flash_fwd', pytest.approx(0.2))


# ptxas's verbose output for one Mosaic kernel (an H200 run, 2026-12-01).
PTXAS_OUTPUT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1300 by compiler to allow use of registers in GMMA in function 'anonymous_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'anonymous_mosaic_gpu_kernel', 116 bytes spill stores, 128 bytes spill loads
    120 bytes stack frame, 116 bytes spill stores, 128 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 120 bytes cumulative stack size, 1 bytes smem
"""


def test_ptxas_report_reads_spills_from_the_process_stdout():
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                  'benchmarks'))
  import ptxas_report  # pylint: disable=g-import-not-at-top
  assert 'MOSAIC_GPU_DUMP_PTXAS' not in os.environ
  with ptxas_report.capture() as reports:
    assert os.environ['MOSAIC_GPU_DUMP_PTXAS'] == '1'
    # As Mosaic's C++ prints it: to file descriptor 1, past sys.stdout.
    os.write(1, PTXAS_OUTPUT.encode())
    os.write(1, b'    0 bytes stack frame, 0 bytes spill stores, '
                b'0 bytes spill loads\n')
  assert 'MOSAIC_GPU_DUMP_PTXAS' not in os.environ
  assert reports == [
      dict(spill_stores=116, spill_loads=128, stack=120,
           notes=['(C7519) warpgroup.arrive is injected in around line 1300 '
                  'by compiler to allow use of registers in GMMA in function '
                  "'anonymous_mosaic_gpu_kernel'"]),
      dict(spill_stores=0, spill_loads=0, stack=0, notes=[])]


def _has_cuda_plugin():
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda13') is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


@pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason='needs the CUDA plugin (jax-cuda13-plugin, jax-cuda13-pjrt), '
    'which requirements.txt leaves out')
def test_ptxas_report_compiles_for_an_h100_without_a_gpu():
  """The deviceless compile's report of a kernel whose causal mask once
  spilled (8 B stored, 36 loaded, in the GPU sweep of 2026-12-07): the
  mask's per-row bound leaves ptxas nothing to spill."""
  variant = 'fwd k128 s2 overlap persistent stagger balance'
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'ptxas_report.py'),
       '--shapes', 's2048_d128', '--causal', 'yes', '--variants', variant],
      capture_output=True, text=True, timeout=300, check=True)
  assert f'{variant:50s} spill stores/loads (B): 0/0' in run.stdout


def test_kernel_profile_shares_exclude_nested_regions():
  """kernel_profile.py's summary of a Mosaic profiler trace (ts in
  kilo-clocks, tid 1 + warpgroup + 3 * CTA): per role, each region's time
  less its nested regions, as a share of the warpgroup's span, averaged over
  CTAs; 'other' is the rest."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import kernel_profile  # pylint: disable=g-import-not-at-top

  def ranges(tid, *spans):
    return [dict(tid=tid, ph=ph, name=name, ts=ts) for name, start, end in
            spans for ph, ts in (('B', start), ('E', end))]

  def nested(tid, outer, inner):  # inner inside outer, both from 0
    return [dict(tid=tid, ph='B', name=outer[0], ts=0.0),
            dict(tid=tid, ph='B', name=inner[0], ts=0.0),
            dict(tid=tid, ph='E', name=inner[0], ts=inner[1]),
            dict(tid=tid, ph='E', name=outer[0], ts=outer[1])]

  events = (nested(1, ('qk', 0.5), ('meet', 0.2)) +
            ranges(1, ('softmax', 0.6, 1.0)) +           # CTA 0, consumer 0
            ranges(2, ('qk', 0.0, 1.0)) +                # consumer 1
            ranges(3, ('load', 0.0, 0.2)) +              # producer
            ranges(4, ('softmax', 0.0, 2.0)))            # CTA 1, consumer 0
  summary = kernel_profile.summarize(dict(traceEvents=events))
  consumer0 = summary['consumer 0']
  assert consumer0['ctas'] == 2 and consumer0['span_clocks'] == 1500
  assert consumer0['share'] == pytest.approx(
      dict(softmax=0.7, qk=0.15, meet=0.1, other=0.05))
  assert summary['consumer 1']['share'] == pytest.approx(dict(qk=1.0,
                                                              other=0.0))
  assert summary['producer']['span_clocks'] == pytest.approx(200)
  assert kernel_profile.timeline(dict(traceEvents=events))[:3] == [
      (0, 'consumer 0', 'B', 'qk'), (0, 'consumer 0', 'B', 'meet'),
      (0, 'consumer 1', 'B', 'qk')]
  # Three consumers (4 warpgroups a CTA): tid 3 is consumer 2, tid 4 the
  # producer.
  three = kernel_profile.summarize(dict(traceEvents=events), consumers=3)
  assert three['consumer 2']['span_clocks'] == pytest.approx(200)
  assert three['producer']['span_clocks'] == pytest.approx(2000)
  assert three['consumer 0']['ctas'] == 1


def test_attention_sweep_times_chosen_variants_in_rounds(monkeypatch):
  """--sweep_mosaic --variants --rounds (an A/B): only the named variants,
  each checked against the reference, then timed once a round in turn
  (every other round backwards); ms is the median of its rounds. On CPU the
  kernels run interpreted and the clock is a stand-in that logs each
  call."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import attention  # pylint: disable=g-import-not-at-top
  for name in ('flash_attention', 'flash_attention_fwd',
               'flash_attention_bwd'):
    monkeypatch.setattr(attention, name, functools.partial(
        getattr(attention, name), interpret=True))
  calls, times = [], iter([3.0, 5.0, 1.0, 2.0, 4.0, 9.0])
  monkeypatch.setattr(attention, 'time_ms',
                      lambda fn, args: calls.append(fn) or next(times))
  names = ['fwd k128 s3 pingpong persistent', 'fwd k128 s3 pingpong']
  records = attention.sweep_mosaic(attention.shape_named('b1_s256_h2_d64'),
                                   True, ('fwd',), names=names, rounds=3)
  ours = [r for r in records if r['part'] == 'fwd']
  assert [r['variant'] for r in ours] == sorted(names, key=[
      attention.describe_mosaic(*v)
      for v in attention.mosaic_variants(64)].index)
  first, second = calls[:2]  # then cuDNN's, for scale (it fails on CPU)
  # Every other round backwards.
  assert first is not second and calls[:6] == [first, second, second, first,
                                               first, second]
  assert [r['ms_rounds'] for r in ours] == [[3.0, 2.0, 4.0], [5.0, 1.0, 9.0]]
  assert [r['ms'] for r in ours] == [3.0, 5.0]
  assert all(r['rel_err'] < 1e-2 for r in ours)
  assert records[-1]['part'] == 'cudnn'


def test_attention_compare_times_impls_in_rounds(monkeypatch):
  """The table's comparison with --rounds: each impl's forward and
  forward+backward timed once a round, the impls in turn (every other round
  backwards); the medians, and the rounds, recorded. An impl that fails is
  recorded with its error. The clock is a stand-in that logs each call."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import attention  # pylint: disable=g-import-not-at-top
  calls = []
  times = iter([3.0, 10.0, 5.0, 7.0,    # xla fwd, fwd+bwd; cudnn the same
                4.0, 9.0, 1.0, 30.0,    # backwards: cudnn, then xla
                2.0, 20.0, 6.0, 8.0])
  monkeypatch.setattr(attention, 'time_ms',
                      lambda fn, args: calls.append(fn) or next(times))
  shape = attention.shape_named('b1_s256_h2_d64')
  xla, bad, cudnn = attention.compare(shape, True, ['xla', 'nope', 'cudnn'],
                                      check_ours=False, rounds=3)
  assert 'unknown impl nope' in bad['error']
  xla_fwd, xla_fwdbwd, cudnn_fwd, cudnn_fwdbwd = calls[:4]
  assert calls == [xla_fwd, xla_fwdbwd, cudnn_fwd, cudnn_fwdbwd,
                   cudnn_fwd, cudnn_fwdbwd, xla_fwd, xla_fwdbwd,
                   xla_fwd, xla_fwdbwd, cudnn_fwd, cudnn_fwdbwd]
  assert xla['fwd_ms_rounds'] == [3.0, 1.0, 2.0]
  assert (xla['fwd_ms'], xla['fwdbwd_ms']) == (2.0, 20.0)
  assert (cudnn['fwd_ms'], cudnn['fwdbwd_ms']) == (5.0, 8.0)
  flops = attention.fwd_flops(shape, True)
  assert xla['tflops_fwd'] == pytest.approx(flops / 2.0 / 1e9)
  assert cudnn['tflops_fwdbwd'] == pytest.approx(3.5 * flops / 8.0 / 1e9)


def test_attention_ratios_to_cudnn_count_the_target():
  """The table's ratios to cuDNN (its time over ours) and the count of
  shapes at 1.05x: a ratio just under 1.05 does not count, a shape where
  either side failed is left out."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import attention  # pylint: disable=g-import-not-at-top

  def record(impl, s, fwd_ms, fwdbwd_ms, **extra):
    return dict(impl=impl, s=s, d=128, b=1, h=16, causal=False,
                fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms, **extra)
  records = [record('mosaic', 1024, 1.0, 3.0), record('cudnn', 1024, 1.2, 3.3),
             record('mosaic', 2048, 1.0, 3.0),
             record('cudnn', 2048, 1.049, 3.3),
             record('mosaic', 4096, 1.0, 3.0, error='boom'),
             record('cudnn', 4096, 2.0, 9.0)]
  ratios, met = attention.ratios_to(records, 'mosaic')
  assert ratios == {(1024, 128, 1, 16, False): pytest.approx((1.2, 1.1)),
                    (2048, 128, 1, 16, False): pytest.approx((1.049, 1.1))}
  assert met == dict(both=1, fwd=1, fwdbwd=2)


@pytest.mark.parametrize('impl', ['mosaic_pad96', 'mosaic_pad128'])
def test_attention_padded_impls_match_reference(monkeypatch, impl):
  """The d80 padding rows (head_dim zero-padded to 96 or 128, sm_scale kept
  at 1/sqrt(80), output sliced back): forward and gradients agree with the
  f32 reference (interpreted on CPU); a head_dim wider than the pad is
  refused."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import attention  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(attention, 'flash_attention', functools.partial(
      attention.flash_attention, interpret=True))
  shape = attention.shape_named('b1_s128_h2_d80')
  assert attention.check(shape, True, impl) < 1e-2
  q = jnp.zeros((1, 128, 2, 160), jnp.bfloat16)
  with pytest.raises(ValueError, match=f'{impl}: head_dim 160'):
    attention.attention_fn(impl, False)(q, q, q)


def test_benchmark_results_never_overwrite_a_kept_file(tmp_path):
  """The benchmarks write to runs/benchmarks/ by default; where their file
  exists (a committed table, an earlier run), the new one gets the time in
  its name, and a later one again its own."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import result_files  # pylint: disable=g-import-not-at-top
  assert result_files.DEFAULT_DIR == os.path.join(ROOT, 'runs', 'benchmarks')
  out = tmp_path / 'results'
  first = result_files.new_path(str(out), 'attention_GPU')
  assert first == str(out / 'attention_GPU.json')
  with open(first, 'w') as f:
    f.write('kept')
  paths = [first]
  for _ in range(2):
    path = result_files.new_path(str(out), 'attention_GPU')
    assert path not in paths and os.path.basename(path).startswith(
        'attention_GPU_')
    with open(path, 'w') as f:
      f.write('new')
    paths.append(path)
  assert open(first).read() == 'kept'


def test_attention_benchmark_refuses_a_machine_without_a_gpu(tmp_path):
  """On CPU the benchmark says so at once, and writes nothing."""
  result = python('benchmarks/attention.py', '--quick', '--out',
                  str(tmp_path))
  assert result.returncode == 2
  assert 'times GPU kernels; this machine has cpu devices only' in (
      result.stderr)
  assert not os.listdir(tmp_path)
