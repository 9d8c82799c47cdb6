"""Starting JAX on several processes (hosts) before anything else runs, and
waiting for each other."""
import itertools
import os

import jax
import orbax.checkpoint as ocp

# Environment variables by which jax.distributed recognises its launchers.
_LAUNCHERS = {'SLURM_NTASKS': 'SLURM', 'OMPI_COMM_WORLD_SIZE': 'Open MPI'}


# Process 0 may take minutes alone (preparing data, moving checkpoints aside)
# while the others wait for it.
BARRIER_TIMEOUT_S = 30 * 60
_barrier_ids = itertools.count()


class LaunchError(ValueError):
  """Process flags that cannot start a multi-process run."""


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None):
  """Starts jax.distributed from the flags, or from SLURM/Open MPI, or not.

  With --coordinator_address every process of the run needs the same address
  and num_processes and its own process_id. Without it, a SLURM or Open MPI
  launch of more than one task is detected; otherwise the run is one process.
  local_device_ids picks this process's GPUs on a host shared by several
  processes (one process per GPU).
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise LaunchError('--coordinator_address, --num_processes and '
                        '--process_id go together; got '
                        f'{coordinator_address!r}, {num_processes!r}, '
                        f'{process_id!r}')
    if not 0 <= process_id < num_processes:
      raise LaunchError(f'--process_id {process_id} is not in [0, '
                        f'--num_processes={num_processes})')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
  elif any(int(os.environ.get(v, '1')) > 1 for v in _LAUNCHERS):
    jax.distributed.initialize(local_device_ids=local_device_ids)
  else:
    return
  if num_processes is not None and jax.process_count() != num_processes:
    raise LaunchError(f'--num_processes={num_processes} but JAX found '
                      f'{jax.process_count()} processes')


def wait_for_all(name):
  """Returns once every process has reached wait_for_all(name). A barrier of
  jax.distributed's coordination service (through Orbax), with our timeout:
  a collective such as sync_global_devices gives up after gloo's 30 s on
  CPU. Every process calls it in the same order, so ids stay unique."""
  ocp.multihost.get_barrier_sync_fn()(
      key=f'{name} ({next(_barrier_ids)})',
      timeout_ms=BARRIER_TIMEOUT_S * 1000)
