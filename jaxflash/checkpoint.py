"""Orbax checkpoints of the train state together with the data iterator.

Orbax writes a step into STEP.orbax-checkpoint-tmp and renames it once every
file is written, so a save cut short (a kill, a full disk) never shows up as a
step; the next run deletes such leftovers (cleanup_tmp_directories). Steps
beyond keep_checkpoints are deleted by the save's finalize thread only after
the new step has committed: a failed commit raises before the deletion
(CheckpointManager._finalize, orbax-checkpoint 0.12), so the last good
checkpoint outlives a failed save.
"""
import contextlib
import logging
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxflash import distributed


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none in the workdir can be read."""


def make_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save(manager, step, state, data_iterator):
  """Starts an async save of `state` and the data position at `step`.

  Raises CheckpointError when this save, or the previous one still being
  written, fails.
  """
  wait(manager)
  try:
    manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))
  except Exception as e:  # pylint: disable=broad-except
    # Storage fails in many types: OSError, TensorStore's ValueError, ...
    raise CheckpointError(_not_written(manager, step, e)) from e


def wait(manager):
  """Waits for the save in flight; CheckpointError if it failed."""
  step = manager.latest_step()  # the step in flight, if any
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(_not_written(manager, step, e)) from e


def _not_written(manager, step, error):
  # Orbax drops the steps a save will delete from its list as the save
  # starts; the disk says which are really there.
  manager.reload()
  intact = max((s for s in manager.all_steps() if s != step), default=None)
  kept = ('there is no earlier checkpoint' if intact is None else
          f'checkpoint {intact} is intact: fix the cause and run the same '
          'command to resume from it')
  return (f'checkpoint {step} could not be written to {manager.directory} '
          f'({_cause(error)}); {kept}')


def _cause(error):
  """One line for an error: its root cause, a long middle elided."""
  while error.__cause__ is not None:
    error = error.__cause__
  # TensorStore appends its whole spec to its messages.
  text = ' '.join(str(error).split(' [tensorstore_spec=')[0].split())
  if len(text) > 300:
    text = f'{text[:120]} ... {text[-160:]}'
  return f'{type(error).__name__}: {text}'


def restore_latest(manager, abstract_state, data_iterator):
  """Restores the latest readable checkpoint: returns its state and sets
  data_iterator's position; None when there is no checkpoint.

  A checkpoint that cannot be read (a file missing, cut short or corrupt, or
  a value not finite) is moved aside to STEP.unreadable-TIME, with a warning,
  and the one before it is used. When none can be read this raises
  CheckpointError and changes nothing: starting over would overwrite the run.
  """
  args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator))
  failed = {}
  for step in reversed(manager.all_steps()):
    try:
      with _quiet_asyncio():
        state = manager.restore(step, args=args).state
      if not _all_finite(state):
        raise ValueError('values that are not finite')
      error = None
    except Exception as e:  # pylint: disable=broad-except
      # A bad file fails in many types: Orbax's, TensorStore's, json's.
      error = e
    # Every process must resume from the same step.
    if not multihost_utils.process_allgather(np.int32(error is not None)).any():
      _set_aside(manager, failed, step)
      return state
    failed[step] = _cause(error) if error else 'unreadable on another process'
  if failed:
    latest = next(iter(failed))
    raise CheckpointError(
        f'no checkpoint in {manager.directory} can be read (tried '
        f'{", ".join(map(str, failed))}; checkpoint {latest}: '
        f'{failed[latest]}); nothing was changed: to start over, move them '
        'away or use another --workdir')
  return None


def _all_finite(state):
  # Training never stores a non-finite value (such steps are skipped), so one
  # here is a corrupt file that decompressed without an error.
  return bool(jax.jit(lambda tree: jnp.stack(
      [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all())(state))


def _set_aside(manager, failed, step):
  """Moves unreadable checkpoints out of the way (saving their step again
  would find the directory taken) and warns."""
  if not failed:
    return
  if jax.process_index() == 0:
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for bad, cause in failed.items():
      name = f'{bad}.unreadable-{stamp}'
      (manager.directory / str(bad)).rename(manager.directory / name)
      print(f'warning: checkpoint {bad} in {manager.directory} is unreadable '
            f'({cause}); moved it to {name}; resuming from checkpoint {step}',
            flush=True)
  distributed.wait_for_all('unreadable checkpoints set aside')
  manager.reload()


@contextlib.contextmanager
def _quiet_asyncio():
  """Orbax reads arrays in asyncio tasks; when one read fails, asyncio logs
  every other task it cancels, with tracebacks. The failure is reported once,
  by restore_latest."""
  asyncio_logger = logging.getLogger('asyncio')
  disabled, asyncio_logger.disabled = asyncio_logger.disabled, True
  try:
    yield
  finally:
    asyncio_logger.disabled = disabled


def restore_params(workdir, abstract_params):
  """(step, parameters) of workdir's latest checkpoint, or None without one.

  Reads only the parameters: no optimizer state, no data position.
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      return None
    item = dict(params=abstract_params)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
  finally:
    manager.close()
  return step, restored.state['params']
