"""GPT-3 125M on OpenWebText, the seed recipe: seq 1024, 512 sequences a step.

The seed trained with fp16 mixed precision (PyTorch AMP); we compute in bf16,
which needs no loss scaling, with float32 parameters and optimizer state.
"""
from jaxflash import config as config_lib


def get_config():
  return config_lib.gpt3_config('125m')
