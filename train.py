"""Train a GPT: python train.py --config configs/tiny.py [--workdir DIR] [--config.KEY=VALUE ...]"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxflash import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints and metrics go here; default runs/<config>.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0, for a run over several processes or hosts; '
    'with --num_processes and --process_id. Without these, SLURM and Open MPI '
    'launches are detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process: 0 .. num_processes - 1.')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None,
    'GPUs of this host for this process, e.g. 0 (one process per GPU).')
flags.mark_flags_as_required(['config'])


def parse_flags(argv):
  """absl's parsing, with bad --config overrides reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    # config_flags raises these for an override of a key the config lacks.
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    key, *hint = str(message).splitlines()
    key = key.strip('"\'')
    given = [a.split('=')[0] for a in argv if a.startswith('--config.')
             and key in a.split('=')[0].split('.')]
    sys.exit(f'error: {", ".join(given) or "--config"}: the config has no key '
             f'{key!r}. {" ".join(hint)}'.strip())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    # Orbax logs a failed save or read from each thread it reaches, with
    # tracebacks; the run reports it once, in one line (CheckpointError).
    logging.get_absl_logger().addFilter(
        lambda record: record.levelno < logging.converter.STANDARD_ERROR
        or f'{os.sep}orbax{os.sep}' not in record.pathname)
  config_path = flags.FLAGS['config'].config_filename
  if not os.path.isfile(config_path):
    sys.exit(f'error: --config: no such file {config_path}')
  from jaxflash import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxflash import distributed  # pylint: disable=g-import-not-at-top
  from jaxflash import trainer  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        _LOCAL_DEVICE_IDS.value and [int(i) for i in _LOCAL_DEVICE_IDS.value])
  except distributed.LaunchError as e:
    sys.exit(f'error: {e}')
  workdir = _WORKDIR.value or os.path.join(
      'runs', os.path.splitext(os.path.basename(config_path))[0])
  try:
    trainer.train(_CONFIG.value, workdir)
  except (config_lib.UsageError, trainer.TrainingStopped,
          checkpoint.CheckpointError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
