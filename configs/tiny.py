"""A tiny GPT on the built-in sample corpus: about 2 minutes on a 2-core CPU."""
from jaxflash import config as config_lib


def get_config():
  c = config_lib.default_config()
  c.model.max_seq_len = 128
  c.model.d_model = 128
  c.model.n_layer = 4
  c.model.n_head = 4
  c.model.dtype = 'float32'  # CPUs lack fast bf16 matmuls
  c.data.seq_len = 128
  c.batch_size = 8
  c.steps = 160
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.log_every = 20
  c.eval_every = 80
  c.eval_batches = 4
  c.checkpoint_every = 80
  return c
