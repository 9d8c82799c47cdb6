"""Sample text from a run's latest checkpoint with a KV cache.

  python -m jaxflash.generate --workdir runs/tiny --prompt "Maya and the" \
      [--max_new_tokens 100 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0]

The prompt runs through the model in one forward pass (the flash kernel on
GPU) that fills a fixed-size cache of keys and values; then each new token is
one jitted decode step attending to the cache.
"""
import codecs
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx

from jaxflash import config as config_lib
from jaxflash import workdir as workdir_lib
from jaxflash.attention import resolve_impl
from jaxflash.data import tokenizer
from jaxflash.model import GPT
from jaxflash.model import ModelConfig
from jaxflash.model import cast_for_compute


def sample_token(logits_BxV, key, *, temperature, top_k, top_p):
  """Next token ids [batch]: greedy at temperature 0, else sampled from the
  top_k (0: all) tokens whose probabilities sum to top_p."""
  # Ids past the tokenizer's vocabulary are padding, never text.
  logits_BxV = logits_BxV[:, :tokenizer.VOCAB_SIZE]
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV,
                            min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token stays when the more likely ones hold less than top_p.
    kept_B = jnp.sum(jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p,
                     axis=-1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


def check_lengths(prompt_len, max_new_tokens, max_seq_len):
  """Raises UsageError when the tokens do not fit the model's positions."""
  if prompt_len > max_seq_len:
    raise config_lib.UsageError(
        f'--prompt: {prompt_len} tokens, longer than the model\'s '
        f'max_seq_len={max_seq_len}')
  # The last new token is never fed back, so it needs no position.
  if prompt_len + max_new_tokens - 1 > max_seq_len:
    raise config_lib.UsageError(
        f'--max_new_tokens: {prompt_len} prompt tokens + {max_new_tokens} '
        f'new ones exceed the model\'s max_seq_len={max_seq_len}; at most '
        f'{max_seq_len - prompt_len + 1} fit')


# Compiled once per model, prompt length, cache length and sampling settings;
# the seed is an argument, so another sample reuses them.
_SAMPLING = ('graphdef', 'temperature', 'top_k', 'top_p')


@functools.partial(jax.jit, static_argnames=('cache_len', *_SAMPLING))
def _prefill(params, tokens_BxT, key, *, cache_len, graphdef, temperature,
             top_k, top_p):
  logits_BxV, cache = nnx.merge(graphdef, params).prefill(tokens_BxT,
                                                          cache_len)
  return sample_token(
      logits_BxV, jax.random.fold_in(key, tokens_BxT.shape[1] - 1),
      temperature=temperature, top_k=top_k, top_p=top_p), cache


@functools.partial(jax.jit, static_argnames=_SAMPLING,
                   donate_argnames='cache')  # updated in place
def _decode(params, tokens_B, cache, position, key, *, graphdef, temperature,
            top_k, top_p):
  logits_BxV, cache = nnx.merge(graphdef, params).decode(tokens_B, cache,
                                                         position)
  return sample_token(
      logits_BxV, jax.random.fold_in(key, position), temperature=temperature,
      top_k=top_k, top_p=top_p), cache


def generate(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=0,
             top_p=1.0, seed=0):
  """Yields max_new_tokens token ids that follow prompt_ids, one at a time.

  The same seed gives the same tokens.
  """
  prompt_len = len(prompt_ids)
  check_lengths(prompt_len, max_new_tokens, model.cfg.max_seq_len)
  cache_len = prompt_len + max_new_tokens - 1
  graphdef, params = nnx.split(model)
  sampling = dict(graphdef=graphdef, temperature=temperature, top_k=top_k,
                  top_p=top_p)
  key = jax.random.key(seed)
  tokens_B, cache = _prefill(params, jnp.asarray([prompt_ids], jnp.int32),
                             key, cache_len=cache_len, **sampling)
  yield int(tokens_B[0])
  for position in range(prompt_len, cache_len):
    tokens_B, cache = _decode(params, tokens_B, cache, jnp.int32(position),
                              key, **sampling)
    yield int(tokens_B[0])


def load_model(workdir, config):
  """The run's GPT with its latest parameters, matmul weights in its dtype."""
  cfg = dataclasses.replace(
      ModelConfig.from_config(config,
                              resolve_impl(config.model.attention_impl)),
      seq_parallel=1, dropout=0.0)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  _, params = workdir_lib.load_params(workdir, cfg)
  return nnx.merge(graphdef, cast_for_compute(params, cfg.dtype))


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A training run\'s workdir.',
                      required=True)
  flags.DEFINE_string('prompt', '', 'Text to continue; empty: start a new '
                      'document.')
  flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to sample.')
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0: greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k likeliest tokens; 0: '
                       'all.')
  flags.DEFINE_float('top_p', 1.0, 'Sample from the likeliest tokens holding '
                     'this much probability (nucleus); 1: all.')
  flags.DEFINE_integer('seed', 0, 'The same seed gives the same text.')


def main(argv):
  workdir_lib.start_cli(argv)
  f = flags.FLAGS
  for ok, problem in ((f.max_new_tokens >= 1, '--max_new_tokens must be >= 1'),
                      (f.temperature >= 0, '--temperature must be >= 0'),
                      (f.top_k >= 0, '--top_k must be >= 0'),
                      (0 < f.top_p <= 1, '--top_p must be in (0, 1]')):
    if not ok:
      sys.exit(f'error: {problem}')
  encoding = tokenizer.get_tokenizer()
  prompt_ids = encoding.encode_ordinary(f.prompt) or [tokenizer.EOS_ID]
  try:
    config = workdir_lib.load_config(f.workdir)
    check_lengths(len(prompt_ids), f.max_new_tokens, config.model.max_seq_len)
    model = load_model(f.workdir, config)
  except config_lib.UsageError as e:
    sys.exit(f'error: {e}')
  # Tokens can end inside a UTF-8 character: decode the bytes as they come.
  text = codecs.getincrementaldecoder('utf-8')(errors='replace')
  sys.stdout.write(f.prompt)
  for token in generate(model, prompt_ids, f.max_new_tokens,
                        temperature=f.temperature, top_k=f.top_k,
                        top_p=f.top_p, seed=f.seed):
    sys.stdout.write(text.decode(encoding.decode_single_token_bytes(token)))
    sys.stdout.flush()
  sys.stdout.write(text.decode(b'', final=True) + '\n')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
