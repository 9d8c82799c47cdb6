"""What a training run left in its workdir: its config and latest parameters."""
import json
import os
import sys

import jax
from absl import flags
from absl import logging
from flax import nnx

from jaxflash import checkpoint
from jaxflash import config as config_lib
from jaxflash import sharding
from jaxflash.model import GPT


def start_cli(argv):
  """The workdir tools' start: no stray arguments; Orbax's INFO logs off."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def load_config(workdir):
  """The run's config.json over the defaults (keys added since keep them)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise config_lib.UsageError(f'--workdir {workdir}: no config.json; not a '
                                'training run\'s workdir')
  config = config_lib.default_config()
  with open(path) as f:
    config.update(json.load(f))
  return config


def load_params(workdir, cfg, mesh=None):
  """(step, parameters of GPT(cfg)) of the latest checkpoint, sharded over
  `mesh` as in training, or on the first device without one."""
  abstract = nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))),
                       nnx.Param)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:
    shardings = sharding.param_shardings(mesh, abstract)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  restored = checkpoint.restore_params(workdir, abstract)
  if restored is None:
    raise config_lib.UsageError(f'--workdir {workdir}: no checkpoint in '
                                f'{os.path.join(workdir, "checkpoints")}')
  return restored
