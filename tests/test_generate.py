"""Sampling with the KV cache: same tokens as full forward passes, seeded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxflash import config as config_lib
from jaxflash import generate
from jaxflash.data import tokenizer
from jaxflash.model import GPT
from jaxflash.model import ModelConfig

PROMPT = [464, 2068, 318, 257, 1332]


# The prompt's forward pass runs the model's attention: the flash kernel too.
@pytest.fixture(scope='module',
                params=['xla', pytest.param('flash', marks=pytest.mark.gpu)])
def model(request):
  cfg = ModelConfig(max_seq_len=32, d_model=64, n_layer=2, n_head=4,
                    dtype='float32', attention_impl=request.param)

  @nnx.jit
  def build():
    model = GPT(cfg, rngs=nnx.Rngs(0))
    # GPT's 0.02 init predicts one token everywhere; larger random weights
    # make greedy decoding change token from step to step.
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1),
                                 len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), params))
    return model

  return build()


forward = nnx.jit(lambda model, tokens_BxT: model(tokens_BxT))


def test_greedy_with_kv_cache_matches_full_forward(model):
  cached = list(generate.generate(model, PROMPT, 12, temperature=0))
  # Causal: position i's logits in one pass over the whole sequence are those
  # a full forward of its first i + 1 tokens gives, so this is greedy decoding
  # recomputed without the cache.
  logits_TxV = forward(model, jnp.asarray([PROMPT + cached]))[0]
  greedy = jnp.argmax(logits_TxV[:, :tokenizer.VOCAB_SIZE], axis=-1)
  assert greedy[len(PROMPT) - 1:-1].tolist() == cached
  assert len(set(cached)) > 3, cached  # the comparison means something


def test_prefill_and_decode_logits_match_full_forward(model):
  # GPUs run float32 matmuls in TF32 by default.
  tol = 2e-5 if jax.default_backend() == 'cpu' else 1e-2
  tokens = PROMPT + [11, 290, 257]
  full_TxV = forward(model, jnp.asarray([tokens]))[0]
  logits_BxV, cache = nnx.jit(lambda m, t: m.prefill(t, len(tokens)))(
      model, jnp.asarray([PROMPT]))
  decode = nnx.jit(lambda m, *args: m.decode(*args))
  np.testing.assert_allclose(logits_BxV[0], full_TxV[len(PROMPT) - 1],
                             atol=tol, rtol=tol)
  for position in range(len(PROMPT), len(tokens)):
    logits_BxV, cache = decode(model, jnp.asarray([tokens[position]]), cache,
                               jnp.int32(position))
    np.testing.assert_allclose(logits_BxV[0], full_TxV[position], atol=tol,
                               rtol=tol)


def test_same_seed_same_sample(model):
  sample = lambda seed: list(generate.generate(
      model, PROMPT, 10, temperature=1.0, top_k=50, top_p=0.9, seed=seed))
  assert sample(3) == sample(3)
  assert sample(3) != sample(4)


def test_top_k_and_top_p_keep_only_the_likeliest():
  logits_1xV = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 200)
  picked = lambda top_k=0, top_p=1.0: set(jax.vmap(
      lambda key: generate.sample_token(logits_1xV, key, temperature=1.0,
                                        top_k=top_k, top_p=top_p)[0])(
          keys).tolist())
  assert picked(top_k=2) == {0, 1}
  # 0.5 + 0.3 < 0.85: the third token is needed, the fourth is not.
  assert picked(top_p=0.85) == {0, 1, 2}
  assert picked() == {0, 1, 2, 3}


def test_too_long_prompt_is_one_clear_error(model):
  with pytest.raises(config_lib.UsageError, match='longer than the model'):
    next(generate.generate(model, [1] * 33, 1))
  with pytest.raises(config_lib.UsageError, match='at most 28 fit'):
    next(generate.generate(model, PROMPT, 29))
