"""GPT-3 1.3B shape at 131,072 tokens a sequence, ring attention over 4 GPUs.

The sequence is split over mesh.seq=4 devices in the zigzag layout (the rest of
the devices, if any, are data parallel). Each block is rematerialized but keeps
attention's output and lse, so the backward never re-runs the ring. Learned
positions cover the whole context; the loss computes logits for 1/32 of
the positions at a time. 4 sequences a step (524k tokens) through
gradient accumulation of one sequence per data-parallel group at a time.
"""
from jaxflash import config as config_lib


def get_config():
  c = config_lib.gpt3_config('1.3b')
  c.model.max_seq_len = 131072
  c.data.seq_len = 131072
  c.mesh.seq = 4
  c.model.remat = 'save_attention'
  c.model.loss_chunks = 32  # logits for 1,024 positions a GPU at a time
  c.batch_size = 4
  c.micro_batch_size = 1
  return c
