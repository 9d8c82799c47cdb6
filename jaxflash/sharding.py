"""The device mesh, and where parameters, optimizer state and batches live.

Mesh axes: 'data' (replicas), 'fsdp' (parameters and optimizer state sharded,
ZeRO-3 style), 'seq' (ring attention over the sequence), 'tensor' (heads and
MLP features split). Each parameter names its logical axes; RULES map logical
axes to mesh axes. The batch is split over data x fsdp. The devices of a
sequence-parallel group hold the same parameters, so they shard them too
(fsdp x seq): otherwise every GPU of a long-context run keeps a whole copy of
the weights and Adam's moments, and the longest trainable sequence grows less
than the number of GPUs.
"""
import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'fsdp', 'seq', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axes of each parameter, by its name in the model.
PARAM_AXES = {
    ('wte', 'embedding'): ('vocab', 'embed'),
    ('wpe', 'embedding'): (None, 'embed'),
    ('qkv', 'kernel'): ('embed', 'heads'),
    ('qkv', 'bias'): ('heads',),
    ('attn_out', 'kernel'): ('heads', 'embed'),
    ('attn_out', 'bias'): ('embed',),
    ('fc', 'kernel'): ('embed', 'mlp'),
    ('fc', 'bias'): ('mlp',),
    ('fc_out', 'kernel'): ('mlp', 'embed'),
    ('fc_out', 'bias'): ('embed',),
    ('scale',): ('embed',),  # every LayerNorm
    ('bias',): ('embed',),
}
# Logical axis -> mesh axis.
RULES = {'embed': ('fsdp', 'seq'), 'vocab': 'tensor', 'heads': 'tensor',
         'mlp': 'tensor'}


def mesh_shape(mesh_config, num_devices):
  """(data, fsdp, seq, tensor); data takes the devices the others leave."""
  others = mesh_config.fsdp * mesh_config.seq * mesh_config.tensor
  return (num_devices // others, mesh_config.fsdp, mesh_config.seq,
          mesh_config.tensor)


def make_mesh(mesh_config, num_devices):
  return jax.make_mesh(mesh_shape(mesh_config, num_devices), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _names(path):
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def logical_axes(path):
  """The logical axes of the parameter at `path` (a pytree key path)."""
  names = tuple(n for n in _names(path) if n != 'value')
  for length in (2, 1):
    if names[-length:] in PARAM_AXES:
      return PARAM_AXES[names[-length:]]
  raise KeyError(f'no logical axes for parameter {"/".join(names)}')


def param_spec(path):
  return P(*(RULES.get(axis) for axis in logical_axes(path)))


def param_shardings(mesh, abstract_params):
  """NamedShardings for the parameters, by the rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: NamedSharding(mesh, param_spec(path)), abstract_params)


def state_shardings(mesh, abstract_state, tx):
  """NamedShardings for the train state: params and their optimizer moments
  by the rules; step, RNG and optimizer counters replicated."""
  replicated = NamedSharding(mesh, P())
  params = param_shardings(mesh, abstract_state['params'])
  opt_state = optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state['opt_state'], params,
      transform_non_params=lambda _: replicated)
  return dict(abstract_state, params=params, opt_state=opt_state,
              step=replicated, rng=replicated)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH_AXES))
