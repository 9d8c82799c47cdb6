"""The training loop: build, restore, step, log, evaluate, checkpoint."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxflash import checkpoint
from jaxflash import config as config_lib
from jaxflash import distributed
from jaxflash import loss as loss_lib
from jaxflash import metrics as metrics_lib
from jaxflash import optimizer as optimizer_lib
from jaxflash import profiler as profiler_lib
from jaxflash import progress as progress_lib
from jaxflash import ring
from jaxflash import sharding
from jaxflash.attention import resolve_impl
from jaxflash.data import loader
from jaxflash.data import prepare
from jaxflash.model import GPT
from jaxflash.model import ModelConfig
from jaxflash.model import cast_for_compute
from jaxflash.model import count_params


class TrainingStopped(RuntimeError):
  """Training cannot go on (non-finite steps); checkpoints are intact."""


class _StopSignals:
  """Notes SIGTERM/SIGINT so the loop can checkpoint and stop cleanly."""

  def __init__(self):
    self.received = None
    self._previous = {}
    # Several processes must stop at the same step: there jax.distributed's
    # preemption sync point (manager.reached_preemption) decides instead.
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._note)

  def _note(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# Model keys that change parameter shapes: a checkpoint cannot change them.
SHAPE_KEYS = ('vocab_size', 'max_seq_len', 'd_model', 'n_layer', 'n_head',
              'mlp_ratio')


def model_config(config):
  return ModelConfig.from_config(config,
                                 resolve_impl(config.model.attention_impl))


def loss_fn(graphdef, params, tokens_BxT1, dropout_key=None):
  """Mean next-token cross-entropy in float32."""
  model = nnx.merge(graphdef, params)
  inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
  positions_T = jnp.arange(inputs_BxT.shape[1])
  n = model.cfg.seq_parallel
  if n > 1:  # ring attention's balanced order; the mean loss is unchanged
    inputs_BxT, targets_BxT = (ring.to_layout(x, n, 'zigzag')
                               for x in (inputs_BxT, targets_BxT))
    positions_T = ring.to_layout(positions_T, n, 'zigzag', axis=0)
  h_BxTxD = model.hidden(inputs_BxT, positions_T, dropout_key)
  return loss_lib.cross_entropy(h_BxTxD, model.wte.embedding[...],
                                targets_BxT, model.cfg.loss_chunks)


def init_state(config, graphdef_and_params, tx):
  graphdef, params = graphdef_and_params
  del graphdef
  return dict(params=params, opt_state=tx.init(params),
              step=jnp.zeros((), jnp.int32),
              rng=jax.random.key_data(jax.random.key(config.seed)))


def make_train_step(graphdef, tx, accum_steps, cfg):
  """One optimizer step over a global batch split into accum_steps parts.

  A step whose loss or gradients are not finite leaves parameters and
  optimizer state as they were (the step still counts); metrics['finite']
  tells the loop.
  """

  def grads_of(compute_params, tokens_BxT1, key):
    return jax.value_and_grad(
        lambda p: loss_fn(graphdef, p, tokens_BxT1, key))(compute_params)

  def mean_grads(compute_params, batch_BxT1, step_key):
    """Mean loss and float32 gradients over the batch, accum_steps parts."""
    keys = jax.random.split(step_key, accum_steps) if cfg.dropout else (
        [None] * accum_steps)
    as_float32 = lambda tree: jax.tree.map(lambda g: g.astype(jnp.float32),
                                           tree)
    if accum_steps == 1:
      loss, grads = grads_of(compute_params, batch_BxT1, keys[0])
      return loss, as_float32(grads)
    # Row r = m * accum_steps + a keeps each device's rows in one microbatch
    # position m, so splitting needs no cross-device movement.
    b, t1 = batch_BxT1.shape
    micro_AxMxT1 = batch_BxT1.reshape(b // accum_steps, accum_steps,
                                      t1).swapaxes(0, 1)

    def accumulate(carry, xs):
      tokens, key = xs
      loss, grads = grads_of(compute_params, tokens, key)
      return jax.tree.map(jnp.add, carry, (loss, as_float32(grads))), None

    zeros = (jnp.zeros(()), as_float32(jax.tree.map(jnp.zeros_like,
                                                    compute_params)))
    scan_keys = keys if cfg.dropout else jnp.zeros((accum_steps,))
    (loss, grads), _ = jax.lax.scan(
        lambda c, xs: accumulate(c, (xs[0], xs[1] if cfg.dropout else None)),
        zeros, (micro_AxMxT1, scan_keys))
    return jax.tree.map(lambda x: x / accum_steps, (loss, grads))

  def data_parallel_mean_grads(compute_params, batch_BxT1, step_key):
    """mean_grads with one all-reduce a step on a purely data-parallel mesh.

    Left to the partitioner, the replicated accumulator would be all-reduced
    after every microbatch; here each device sums its own microbatches.
    check_vma=False keeps autodiff from summing the gradients of the
    replicated parameters inside the loop: pmean does it once. Meshes with
    fsdp, seq or tensor axes stay with the partitioner (XLA 0.11 cannot
    partition this shard_map manual over 'data' alone).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get('data', 1) == 1 or any(
        size > 1 for name, size in mesh.shape.items() if name != 'data'):
      return mean_grads(compute_params, batch_BxT1, step_key)

    def local(compute_params, batch_BxT1, step_key):
      step_key = jax.random.fold_in(step_key, jax.lax.axis_index('data'))
      return jax.lax.pmean(mean_grads(compute_params, batch_BxT1, step_key),
                           'data')

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data'), P()),
                         out_specs=P(), check_vma=False)(
                             compute_params, batch_BxT1, step_key)

  def train_step(state, batch_BxT1):
    params = state['params']
    # The matmul weights go to cfg.dtype once here, not once a microbatch;
    # their gradients come back in cfg.dtype and are summed in float32.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                                  state['step'])
    loss, grads = data_parallel_mean_grads(
        cast_for_compute(params, cfg.dtype), batch_BxT1, step_key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
      updates, opt_state = tx.update(grads, state['opt_state'], params)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(
        finite, update, lambda: (params, state['opt_state']))
    new_state = dict(state, params=params, opt_state=opt_state,
                     step=state['step'] + 1)
    return new_state, dict(loss=loss, grad_norm=grad_norm, finite=finite)

  return train_step


def _prepare_workdir(workdir, config):
  """Creates workdir and records the config; refuses an unwritable workdir
  and one whose checkpoints hold a model of another shape."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise config_lib.UsageError(f'--workdir {workdir}: cannot create it '
                                f'({e.strerror})') from None
  if not os.access(workdir, os.W_OK):
    raise config_lib.UsageError(f'--workdir {workdir}: not writable')
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path) and os.path.isdir(os.path.join(workdir,
                                                         'checkpoints')):
    with open(path) as f:
      before = json.load(f).get('model', {})
    differ = [f'{k} {before[k]} there, {config.model[k]} here'
              for k in SHAPE_KEYS if k in before and before[k] !=
              config.model[k]]
    if differ:
      raise config_lib.ConfigError(
          'model', f'the checkpoints in {workdir} hold another model shape ('
          f'{"; ".join(differ)}); use another --workdir')
  if jax.process_index() == 0:
    # Whole or not at all: the other processes may be reading it just now.
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)


def train(config, workdir):
  """Trains until config.steps, resuming from workdir's latest checkpoint."""
  num_devices = jax.device_count()
  config_lib.validate(config, num_devices)
  _prepare_workdir(workdir, config)
  if config.data.dataset == 'sample':
    # Process 0 first, so processes sharing a disk do not all build it.
    if jax.process_index() == 0:
      prepare.prepare_sample(config.data.data_dir)
    distributed.wait_for_all('sample data prepared')
    prepare.prepare_sample(config.data.data_dir)

  mesh = sharding.make_mesh(config.mesh, num_devices)
  # The model finds the mesh here for ring attention's shard_map.
  with jax.set_mesh(mesh):
    replicated = NamedSharding(mesh, P())
    batch_sharding = sharding.batch_sharding(mesh)
    cfg = model_config(config)
    accum_steps = config_lib.accumulation_steps(config, num_devices)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.steps)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer,
                                                    config.steps)

    def build():
      model = GPT(cfg, rngs=nnx.Rngs(config.seed))
      return init_state(config, nnx.split(model, nnx.Param), tx)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    abstract_state = jax.eval_shape(build)
    state_sharding = sharding.state_shardings(mesh, abstract_state, tx)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, state_sharding)

    data_iterator = iter(loader.train_dataset(config))
    manager = checkpoint.make_manager(workdir, config)
    state = checkpoint.restore_latest(manager, abstract_state, data_iterator)
    if state is None:
      state = jax.jit(build, out_shardings=state_sharding)()
    start_step = int(state['step'])
    writer = metrics_lib.MetricsWriter(workdir, start_step)
    num_params = count_params(cfg)
    tokens_per_step = config.batch_size * config.data.seq_len
    flops_per_step = tokens_per_step * metrics_lib.flops_per_token(
        cfg, num_params, config.data.seq_len)
    peak = metrics_lib.peak_flops_per_device()
    if jax.process_index() == 0:
      resumed = (f'resuming at step {start_step}' if start_step
                 else 'from scratch')
      print(f'{num_params:,} parameters | {num_devices} devices | attention '
            f'{cfg.attention_impl} | accumulation {accum_steps} | {resumed}',
            flush=True)
      if start_step >= config.steps:
        print(f'the latest checkpoint is at step {start_step}, steps is '
              f'{config.steps}: nothing to train (raise --config.steps to '
              'go on)', flush=True)

    train_step = jax.jit(
        make_train_step(graphdef, tx, accum_steps, cfg),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated), donate_argnums=0)
    eval_step = jax.jit(lambda params, batch: loss_fn(graphdef, params, batch),
                        in_shardings=(state_sharding['params'], batch_sharding),
                        out_shardings=replicated)
    to_global = lambda local: jax.make_array_from_process_local_data(
        batch_sharding, local)
    eval_data = [to_global(b) for b in loader.eval_batches(config)]

    timer_start, timer_step = None, start_step
    nonfinite_steps, nonfinite_in_a_row = 0, 0
    signals = _StopSignals()
    progress = progress_lib.TrainProgress(start_step, config.steps,
                                          tokens_per_step)
    profiler = profiler_lib.StepProfiler(config_lib.profile_range(config),
                                         workdir)
    try:
      for step in range(start_step, config.steps):
        done = step + 1
        profiler.before_step(done)
        state, step_metrics = train_step(state,
                                         to_global(next(data_iterator)))
        profiler.after_step(done, step_metrics)
        if timer_start is None:  # leave compilation out of the throughput
          jax.block_until_ready(step_metrics)
          timer_start, timer_step = time.perf_counter(), done
        if not bool(step_metrics['finite']):  # a host sync every step
          nonfinite_steps += 1
          nonfinite_in_a_row += 1
          problem = (f'step {done}: loss {float(step_metrics["loss"])}, '
                     f'gradient norm {float(step_metrics["grad_norm"])}; '
                     'the update was skipped')
          if (config.on_nan == 'stop'
              or nonfinite_in_a_row > config.max_nan_skips):
            checkpoint.wait(manager)
            raise TrainingStopped(
                f'{problem}; stopping (on_nan={config.on_nan}, '
                f'{nonfinite_in_a_row} in a row); the latest checkpoint, '
                f'step {manager.latest_step() or "none yet"}, is intact')
          if jax.process_index() == 0:
            progress_lib.write(
                f'warning: {problem} ({nonfinite_in_a_row} in a row)')
        else:
          nonfinite_in_a_row = 0
        progress.update(done)
        if done % config.log_every == 0 or done in (1, config.steps):
          loss = float(step_metrics['loss'])  # waits for the step
          elapsed = time.perf_counter() - timer_start
          steps_timed = done - timer_step
          step_time = elapsed / steps_timed if steps_timed else None
          tokens_per_sec = tokens_per_step / step_time if step_time else None
          mfu = (flops_per_step / step_time / (peak * num_devices)
                 if step_time and peak else None)
          record = dict(step=done, loss=loss,
                        grad_norm=float(step_metrics['grad_norm']),
                        lr=float(schedule(step)),
                        tokens_per_sec=tokens_per_sec, mfu=mfu,
                        step_time=step_time,
                        peak_mem_gib=metrics_lib.peak_memory_gib(),
                        nonfinite_steps=nonfinite_steps)
          if eval_data and (done % config.eval_every == 0
                            or done == config.steps):
            record['eval_loss'] = float(np.mean(
                [eval_step(state['params'], b) for b in eval_data]))
          writer.write(record)
          timer_start, timer_step = time.perf_counter(), done
        stop = signals.received or (
            jax.process_count() > 1 and manager.reached_preemption(done)
            and 'preemption')
        if (done % config.checkpoint_every == 0 or done == config.steps
            or stop):
          checkpoint.save(manager, done, state, data_iterator)
        if stop:
          checkpoint.wait(manager)
          if jax.process_index() == 0:
            progress_lib.write(f'stopped at step {done} on {stop}: '
                               'checkpoint saved; run the same command to '
                               'resume')
          break
    finally:
      signals.restore()
      progress.close()
      profiler.stop()
      writer.close()
    checkpoint.wait(manager)
    manager.close()
    return state
