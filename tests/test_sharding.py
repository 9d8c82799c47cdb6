"""FSDP/tensor sharding rules, and training that does not depend on the mesh."""
import json
import os

import jax
import pytest
from flax import nnx

from jaxflash import config as config_lib
from jaxflash import optimizer as optimizer_lib
from jaxflash import sharding
from jaxflash import trainer
from jaxflash.model import GPT
from jax.sharding import PartitionSpec as P


def tiny_config(**mesh):
  c = config_lib.default_config()
  c.model.update(vocab_size=50264, max_seq_len=32, d_model=32, n_layer=2,
                 n_head=4, dtype='float32', attention_impl='xla')
  c.mesh.update(mesh)
  return c


def test_rules_place_every_parameter_and_its_moments():
  config = tiny_config(fsdp=2, seq=2, tensor=2)
  cfg = trainer.model_config(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, 10)
  abstract = jax.eval_shape(lambda: trainer.init_state(
      config, nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param), tx))
  mesh = sharding.make_mesh(config.mesh, 8)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 2, 'seq': 2, 'tensor': 2}
  shardings = sharding.state_shardings(mesh, abstract, tx)
  params = nnx.to_pure_dict(shardings['params'])
  # A sequence-parallel group shares its parameters, so it shards them too.
  embed = ('fsdp', 'seq')
  specs = {
      ('wte', 'embedding'): P('tensor', embed),
      ('wpe', 'embedding'): P(None, embed),
      ('ln_f', 'scale'): P(embed),
  }
  for (module, name), spec in specs.items():
    assert params[module][name].spec == spec
  block = params['blocks'][1]
  assert block['qkv']['kernel'].spec == P(embed, 'tensor')
  assert block['qkv']['bias'].spec == P('tensor')
  assert block['attn_out']['kernel'].spec == P('tensor', embed)
  assert block['fc']['kernel'].spec == P(embed, 'tensor')
  assert block['fc_out']['kernel'].spec == P('tensor', embed)
  assert block['ln_2']['bias'].spec == P(embed)
  # Every parameter got a rule; Adam's moments sit where their parameter is.
  param_specs = [s.spec for s in jax.tree.leaves(shardings['params'])]
  assert len(param_specs) == len(jax.tree.leaves(abstract['params']))
  moment_specs = [s.spec for s in jax.tree.leaves(shardings['opt_state'])
                  if s.spec != P()]
  assert moment_specs == [s for s in param_specs if s != P()] * 2
  assert shardings['step'].spec == P()


def run(tmp_path, name, **mesh):
  config = tiny_config(**mesh)
  config.data.update(data_dir=str(tmp_path / 'data'), seq_len=32)
  config.update(batch_size=8, steps=3, log_every=1, eval_every=3,
                eval_batches=1, checkpoint_every=3)
  config.optimizer.warmup_steps = 1
  workdir = tmp_path / name
  state = trainer.train(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    return state, [json.loads(line)['loss'] for line in f]


def test_training_is_the_same_on_every_mesh(tmp_path):
  _, base = run(tmp_path, 'data')
  state, fsdp = run(tmp_path, 'fsdp', fsdp=4)
  _, mixed = run(tmp_path, 'mixed', fsdp=2, tensor=2)
  _, seq = run(tmp_path, 'seq', fsdp=2, seq=2)
  for losses in (fsdp, mixed, seq):
    assert losses == pytest.approx(base, rel=2e-5)
  kernel = state['params']['blocks'][0]['fc']['kernel']
  assert kernel.sharding.spec == P(('fsdp', 'seq'), 'tensor')
  # Each device holds a quarter of an fsdp=4 parameter.
  assert kernel.addressable_shards[0].data.shape == (8, 128)
