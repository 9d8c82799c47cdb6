"""GPT shapes, parameter counts, and that a few steps overfit one batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxflash import config as config_lib
from jaxflash import optimizer as optimizer_lib
from jaxflash import trainer
from jaxflash.model import GPT
from jaxflash.model import ModelConfig
from jaxflash.model import cast_for_compute
from jaxflash.model import count_params
from jaxflash.model import tied_logits


def test_gpt2_124m_parameter_count():
  # GPT-2 small with its unpadded vocabulary: the published 124,439,808.
  assert count_params(ModelConfig(vocab_size=50257)) == 124_439_808


@pytest.mark.parametrize('size,expected', [
    ('125m', 124_445_184), ('2.7b', 2_648_949_760)])
def test_gpt3_parameter_counts_from_configs(size, expected):
  config = config_lib.gpt3_config(size)
  assert count_params(trainer.model_config(config)) == expected


def test_gpt3_2_7b_shape():
  cfg = trainer.model_config(config_lib.gpt3_config('2.7b'))
  assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.head_dim) == (
      2560, 32, 32, 80)
  assert cfg.vocab_size == 50264 and cfg.vocab_size % 8 == 0


def test_init_scales_residual_projections():
  cfg = ModelConfig(vocab_size=512, max_seq_len=64, d_model=256, n_layer=8,
                    n_head=4)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  std = lambda x: float(jnp.std(x[...]))
  assert std(model.blocks[0].qkv.kernel) == pytest.approx(0.02, rel=0.05)
  assert std(model.blocks[0].fc_out.kernel) == pytest.approx(
      0.02 / 4, rel=0.05)  # 1 / sqrt(2 * 8)
  assert std(model.wte.embedding) == pytest.approx(0.02, rel=0.05)


def test_logits_are_float32_and_causal():
  cfg = ModelConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layer=2,
                    n_head=2)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  logits = model(tokens)
  assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 64)
  # Positions before 10 cannot see token 10.
  np.testing.assert_array_equal(model(changed)[:, :10], logits[:, :10])
  assert not np.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_weight_decay_mask_skips_biases_norms_embeddings():
  cfg = ModelConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layer=1,
                    n_head=2)
  params = nnx.state(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  mask = nnx.to_pure_dict(optimizer_lib.weight_decay_mask(params))
  assert mask['blocks'][0]['qkv']['kernel'] is True
  assert mask['blocks'][0]['qkv']['bias'] is False
  assert mask['blocks'][0]['ln_1']['scale'] is False
  assert mask['wte']['embedding'] is False and mask['wpe']['embedding'] is False


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_overfits_a_fixed_batch(accum_steps):
  config = config_lib.default_config()
  config.model.update(vocab_size=128, max_seq_len=32, d_model=64, n_layer=2,
                      n_head=4, dtype='float32', attention_impl='xla')
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  config.steps = 40
  cfg = trainer.model_config(config)
  tx = optimizer_lib.make_optimizer(config.optimizer, config.steps)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  state = trainer.init_state(config, (graphdef, params), tx)
  step = jax.jit(trainer.make_train_step(graphdef, tx, accum_steps, cfg))
  batch = jax.random.randint(jax.random.key(1), (8, 33), 0, 128)
  losses = []
  for _ in range(config.steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[0] > 4.0  # about ln(128) at init
  assert losses[-1] < 0.2 * losses[0]


def _loss_and_grads(config, tokens, key, values):
  """(loss, grads) of the same initial GPT for each value of model.<key>."""
  results = []
  for value in values:
    config.model[key] = value
    graphdef, params = nnx.split(
        GPT(trainer.model_config(config), rngs=nnx.Rngs(0)), nnx.Param)
    results.append(jax.value_and_grad(
        lambda p, g=graphdef: trainer.loss_fn(g, p, tokens))(params))
  return results


def test_flash_attention_model_matches_xla():
  # The Pallas kernel (interpret mode on CPU) inside the GPT: same loss and
  # gradients as the reference attention.
  config = config_lib.default_config()
  config.model.update(vocab_size=96, max_seq_len=40, d_model=64, n_layer=2,
                      n_head=4, dtype='float32')
  tokens = jax.random.randint(jax.random.key(2), (2, 38), 0, 96)
  (loss_xla, grads_xla), (loss_flash, grads_flash) = _loss_and_grads(
      config, tokens, 'attention_impl', ('xla', 'flash'))
  np.testing.assert_allclose(loss_flash, loss_xla, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_flash), jax.tree.leaves(grads_xla)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_flash_backend_reaches_the_kernels():
  # model.flash_backend=mosaic runs the Hopper kernels (their CPU
  # interpreter here): the same loss as the Triton kernels, bf16 compute.
  config = config_lib.default_config()
  config.model.update(vocab_size=96, max_seq_len=128, d_model=128, n_layer=1,
                      n_head=2, dtype='bfloat16', attention_impl='flash')
  tokens = jax.random.randint(jax.random.key(4), (1, 129), 0, 96)
  (loss, grads), (loss_mosaic, grads_mosaic) = _loss_and_grads(
      config, tokens, 'flash_backend', ('triton', 'mosaic'))
  np.testing.assert_allclose(loss_mosaic, loss, rtol=2e-3)
  for a, b in zip(jax.tree.leaves(grads_mosaic), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=2e-3)
  with pytest.raises(ValueError, match=r"backend='mosaic' needs seq_q"):
    _loss_and_grads(config, tokens[:, :101], 'flash_backend', ('mosaic',))


def test_casting_matmul_weights_once_keeps_gradients():
  # The train step casts the Linear weights to bfloat16 before the
  # microbatch loop: gradients must equal those through the per-use casts.
  cfg = ModelConfig(vocab_size=96, max_seq_len=24, d_model=64, n_layer=2,
                    n_head=4, dtype='bfloat16')
  graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, 96)
  grad = jax.jit(jax.value_and_grad(
      lambda p: trainer.loss_fn(graphdef, p, tokens)))
  loss, grads = grad(params)
  compute_params = cast_for_compute(params, cfg.dtype)
  assert compute_params['blocks'][0]['fc']['kernel'].dtype == jnp.bfloat16
  assert compute_params['blocks'][0]['ln_1']['scale'].dtype == jnp.float32
  assert compute_params['wte']['embedding'].dtype == jnp.float32
  loss_cast, grads_cast = grad(compute_params)
  assert loss_cast == loss
  for path, a in jax.tree.leaves_with_path(grads_cast):
    b = dict(jax.tree.leaves_with_path(grads))[path]
    np.testing.assert_array_equal(np.asarray(a, np.float32), b,
                                  err_msg=jax.tree_util.keystr(path))


def test_tied_logits_backward_matches_autodiff():
  h = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.float32)
  wte = jax.random.normal(jax.random.key(1), (40, 16), jnp.float32)
  g = jax.random.normal(jax.random.key(2), (2, 5, 40), jnp.float32)
  out, vjp = jax.vjp(tied_logits, h, wte)
  expected_out, expected_vjp = jax.vjp(
      lambda h, w: jnp.einsum('btd,vd->btv', h, w), h, wte)
  np.testing.assert_allclose(out, expected_out, rtol=1e-6)
  expected_dh, expected_dwte = expected_vjp(g)
  dh, dwte = vjp(g)
  np.testing.assert_allclose(dh, expected_dh, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dwte, expected_dwte, rtol=1e-5, atol=1e-5)
  # In bfloat16 the backward matmuls take a bfloat16 cotangent.
  _, vjp = jax.vjp(tied_logits, h.astype(jnp.bfloat16), wte)
  dh, dwte = vjp(g)
  assert dh.dtype == jnp.bfloat16 and dwte.dtype == jnp.float32
  np.testing.assert_allclose(dwte, expected_dwte, rtol=0.05, atol=0.05)


def test_chunked_loss_matches_whole():
  config = config_lib.default_config()
  config.model.update(vocab_size=96, max_seq_len=32, d_model=32, n_layer=1,
                      n_head=2, dtype='float32', attention_impl='xla')
  tokens = jax.random.randint(jax.random.key(4), (2, 33), 0, 96)
  (loss, grads), (loss_c, grads_c) = _loss_and_grads(
      config, tokens, 'loss_chunks', (1, 4))
  np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
