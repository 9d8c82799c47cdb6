"""Config validation names the offending key before anything compiles."""
import pytest

from jaxflash import config as config_lib


def _config(**overrides):
  c = config_lib.default_config()
  c.model.update(d_model=64, n_head=4, max_seq_len=128)
  c.data.seq_len = 128
  c.batch_size = 8
  for key, value in overrides.items():
    parent = c
    *path, leaf = key.split('.')
    for part in path:
      parent = parent[part]
    parent[leaf] = value
  return c


def test_default_config_is_valid():
  config_lib.validate(_config(), num_devices=1)


@pytest.mark.parametrize('key,value,num_devices', [
    ('model.n_head', 5, 1),
    ('data.seq_len', 256, 1),
    ('model.attention_impl', 'cuda', 1),
    ('model.flash_backend', 'cudnn', 1),
    ('model.dtype', 'int8', 1),
    ('optimizer.schedule', 'step', 1),
    ('optimizer.warmup_steps', 10**9, 1),
    ('batch_size', 6, 4),
    ('micro_batch_size', 3, 1),
    ('steps', 0, 1),
    ('model.dropout', 1.5, 1),
    ('data.dataset', 'not_prepared_here', 1),
    ('eval_batches', -1, 1),
    ('data.seq_len', 102, 4),  # with mesh.seq=2 below: not divisible by 4
    ('model.remat', 'some', 1),
    ('model.loss_chunks', 3, 1),  # seq_len 128
    ('model.vocab_size', 1000, 1),
])
def test_bad_values_name_their_key(key, value, num_devices):
  overrides = {key: value}
  if key == 'data.seq_len' and value == 102:
    overrides['mesh.seq'] = 2
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}:'):
    config_lib.validate(_config(**overrides), num_devices=num_devices)


def test_accumulation_steps():
  c = _config(batch_size=32, micro_batch_size=4)
  config_lib.validate(c, num_devices=2)
  assert config_lib.accumulation_steps(c, num_devices=2) == 4
  assert config_lib.accumulation_steps(_config(), num_devices=2) == 1


@pytest.mark.parametrize('overrides,num_devices,key', [
    ({'mesh.seq': 3}, 4, 'mesh'),
    ({'mesh.fsdp': 3}, 8, 'mesh'),
    ({'mesh.tensor': 8}, 8, 'mesh.tensor'),  # 4 heads
    ({'mesh.fsdp': 8, 'model.d_model': 36, 'model.n_head': 4}, 8,
     'mesh.fsdp'),
    ({'mesh.fsdp': 2, 'mesh.tensor': 2}, 8, 'batch_size'),  # 6 % (2*2)
])
def test_bad_meshes_are_refused(overrides, num_devices, key):
  if key == 'batch_size':
    overrides = dict(overrides, batch_size=6)
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}:'):
    config_lib.validate(_config(**overrides), num_devices=num_devices)


def test_flash_head_dim_is_checked_with_the_kernels_rule():
  # d_model 64 over 8 heads gives head_dim 8; the kernel needs 16 to 256.
  flash = _config(**{'model.n_head': 8, 'model.attention_impl': 'flash'})
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.model.n_head: model.d_model=64 / n_head=8 '
                     r'gives head_dim 8, .*multiple of 8 in \[16, 256\]'):
    config_lib.validate(flash, num_devices=1)
  xla = _config(**{'model.n_head': 8, 'model.attention_impl': 'xla'})
  config_lib.validate(xla, num_devices=1)  # XLA takes any head_dim
