"""Orbax checkpoints of the train state together with the data iterator."""
import os

import grain
import orbax.checkpoint as ocp


def make_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save(manager, step, state, data_iterator):
  """Starts an async save of `state` and the data position at `step`."""
  return manager.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore_latest(manager, abstract_state, data_iterator):
  """Returns the latest state (data_iterator restored in place) or None."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored.state


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
