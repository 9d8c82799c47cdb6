"""Validation loss and perplexity of a run's latest checkpoint.

  python -m jaxflash.evaluate --workdir runs/tiny [--batches N]

Reads the batches the trainer's evaluation reads (the first N of the prepared
validation split) and computes the same loss, on the run's mesh.
"""
import math
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from jaxflash import config as config_lib
from jaxflash import sharding
from jaxflash import trainer
from jaxflash import workdir as workdir_lib
from jaxflash.data import loader
from jaxflash.data import prepare
from jaxflash.model import GPT


def evaluate(config, workdir):
  """(checkpoint step, mean validation loss, batches): config.eval_batches
  of them, or fewer where the validation split runs out."""
  num_devices = jax.device_count()
  config_lib.validate(config, num_devices)
  if config.data.dataset == 'sample':
    prepare.prepare_sample(config.data.data_dir)
  mesh = sharding.make_mesh(config.mesh, num_devices)
  with jax.set_mesh(mesh):
    cfg = trainer.model_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    step, params = workdir_lib.load_params(workdir, cfg, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    loss = jax.jit(lambda p, batch: trainer.loss_fn(graphdef, p, batch))
    losses = [loss(params, jax.make_array_from_process_local_data(
        batch_sharding, batch)) for batch in loader.eval_batches(config)]
  return step, float(np.mean(losses)), len(losses)


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A training run\'s workdir.',
                      required=True)
  flags.DEFINE_integer('batches', None, 'Validation batches of the run\'s '
                       'batch_size; default: the run\'s eval_batches.')


def main(argv):
  workdir_lib.start_cli(argv)
  f = flags.FLAGS
  try:
    config = workdir_lib.load_config(f.workdir)
    # A run without evaluation (eval_batches=0) gets the default count.
    config.eval_batches = (f.batches if f.batches is not None else
                           config.eval_batches or
                           config_lib.default_config().eval_batches)
    if config.eval_batches < 1:
      raise config_lib.UsageError('--batches must be >= 1')
    step, loss, batches = evaluate(config, f.workdir)
  except config_lib.UsageError as e:
    sys.exit(f'error: {e}')
  print(f'step {step} | validation loss {loss:.4f} | perplexity '
        f'{math.exp(loss):,.2f} | {batches} batches of '
        f'{config.batch_size} x {config.data.seq_len} tokens')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
