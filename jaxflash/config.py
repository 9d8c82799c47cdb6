"""Default configuration, the GPT-3 family's shapes, and config validation.

Configs are ml_collections ConfigDicts built by `get_config()` in configs/*.py.
`validate` runs before anything is compiled and raises ConfigError naming the key.
"""
import ml_collections

from jaxflash.data.tokenizer import VOCAB_SIZE as GPT2_VOCAB_SIZE

# GPT-3 paper, Table 2.1: d_model, n_layer, n_head, learning rate.
GPT3_SIZES = {
    '125m': dict(d_model=768, n_layer=12, n_head=12, learning_rate=6e-4),
    '350m': dict(d_model=1024, n_layer=24, n_head=16, learning_rate=3e-4),
    '760m': dict(d_model=1536, n_layer=24, n_head=16, learning_rate=2.5e-4),
    '1.3b': dict(d_model=2048, n_layer=24, n_head=32, learning_rate=2e-4),
    '2.7b': dict(d_model=2560, n_layer=32, n_head=32, learning_rate=1.6e-4),
}

ATTENTION_IMPLS = ('auto', 'xla', 'flash')
FLASH_BACKENDS = ('triton', 'mosaic', 'auto')  # kernels.flash_attention's
# none; full: recompute each block; save_attention: recompute each block but
# keep attention's output and lse (the attention forward never re-runs);
# dots: keep matmul outputs.
REMAT_POLICIES = ('none', 'full', 'save_attention', 'dots')
ON_NAN = ('stop', 'skip')
SCHEDULES = ('cosine', 'linear')
DTYPES = ('float32', 'bfloat16', 'float16')


class UsageError(ValueError):
  """Input that cannot work, found before anything compiles: one line."""


class ConfigError(UsageError):
  """A config value that cannot work; the message names the key."""

  def __init__(self, key, message):
    super().__init__(f'config.{key}: {message}')
    self.key = key


def default_config():
  """Everything a run needs; configs/*.py override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 50264  # GPT-2's 50257 padded to a multiple of 8.
  c.model.max_seq_len = 1024  # learned position embeddings
  c.model.d_model = 768
  c.model.n_layer = 12
  c.model.n_head = 12
  c.model.mlp_ratio = 4
  c.model.scale_attn_by_inverse_layer_idx = True
  c.model.dropout = 0.0
  # 'auto': the Pallas flash kernel on GPU, the XLA reference elsewhere.
  c.model.attention_impl = 'auto'
  # The flash kernels' backend: 'triton' (any GPU), 'mosaic' (Hopper) or
  # 'auto' (mosaic on compute capability 9.x where the shape allows).
  c.model.flash_backend = 'auto'
  c.model.dtype = 'bfloat16'  # compute; parameters stay float32
  c.model.remat = 'none'  # one of REMAT_POLICIES
  # Positions' logits computed at a time in the loss: 1/loss_chunks of them.
  c.model.loss_chunks = 1

  # Mesh axes (jaxflash/sharding.py): fsdp shards parameters and optimizer
  # state, seq runs ring attention over the sequence (zigzag layout), tensor
  # splits heads and MLP features. The remaining devices form 'data'.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1
  c.mesh.seq = 1
  c.mesh.tensor = 1

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'sample'  # built-in corpus, generated on first use
  c.data.data_dir = 'data'
  c.data.seq_len = 1024
  c.data.prefetch = 2  # batches read ahead by a background thread

  c.batch_size = 512  # global sequences per optimizer step
  # Sequences per device per forward/backward; the rest of batch_size is
  # reached by gradient accumulation. 0 means no accumulation.
  c.micro_batch_size = 0
  c.steps = 10_000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 200
  c.optimizer.schedule = 'cosine'
  c.optimizer.min_lr_ratio = 0.1  # final learning rate / peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip = 1.0

  # A step whose loss or gradients are not finite: 'stop' the run, or 'skip'
  # its update (at most max_nan_skips in a row, then stop).
  c.on_nan = 'stop'
  c.max_nan_skips = 3

  c.log_every = 10
  c.eval_every = 500
  c.eval_batches = 10  # 0: no evaluation
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  # 'A:B' traces steps A..B (1-based, inclusive) with jax.profiler into
  # WORKDIR/profile; '' is off.
  c.profile_steps = ''
  return c


def gpt3_config(size):
  """The seed recipe for one GPT-3 size: seq 1024, 512 sequences a step."""
  shape = GPT3_SIZES[size]
  c = default_config()
  c.model.d_model = shape['d_model']
  c.model.n_layer = shape['n_layer']
  c.model.n_head = shape['n_head']
  c.optimizer.learning_rate = shape['learning_rate']
  c.data.dataset = 'openwebtext'
  return c


def _check(ok, key, message):
  if not ok:
    raise ConfigError(key, message)


def _check_positive(config, *keys):
  for key in keys:
    value = _lookup(config, key)
    _check(isinstance(value, int) and value > 0, key,
           f'must be a positive integer, got {value!r}')


def _lookup(config, key):
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def validate(config, num_devices):
  """Raises ConfigError for the first value that cannot work."""
  m = config.model
  _check_positive(config, 'model.vocab_size', 'model.max_seq_len',
                  'model.d_model', 'model.n_layer', 'model.n_head',
                  'model.mlp_ratio', 'data.seq_len', 'batch_size', 'steps',
                  'log_every', 'eval_every', 'checkpoint_every',
                  'keep_checkpoints', 'mesh.fsdp', 'mesh.seq', 'mesh.tensor')
  # Every prepared dataset holds GPT-2 token ids; a smaller table would read
  # out of range and train on NaN.
  _check(m.vocab_size >= GPT2_VOCAB_SIZE, 'model.vocab_size',
         f'{m.vocab_size} is smaller than the GPT-2 tokenizer\'s '
         f'{GPT2_VOCAB_SIZE} tokens')
  _check(m.d_model % m.n_head == 0, 'model.n_head',
         f'{m.n_head} does not divide model.d_model={m.d_model}')
  _check(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl',
         f'{m.attention_impl!r} is not one of {ATTENTION_IMPLS}')
  _check(m.flash_backend in FLASH_BACKENDS, 'model.flash_backend',
         f'{m.flash_backend!r} is not one of {FLASH_BACKENDS}')
  _check(m.dtype in DTYPES, 'model.dtype',
         f'{m.dtype!r} is not one of {DTYPES}')
  _check(m.remat in REMAT_POLICIES, 'model.remat',
         f'{m.remat!r} is not one of {REMAT_POLICIES}')
  _check(0.0 <= m.dropout < 1.0, 'model.dropout',
         f'must be in [0, 1), got {m.dropout}')
  _check(config.data.seq_len <= m.max_seq_len, 'data.seq_len',
         f'{config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}')
  _check_flash_head_dim(config)
  o = config.optimizer
  _check(config.on_nan in ON_NAN, 'on_nan',
         f'{config.on_nan!r} is not one of {ON_NAN}')
  _check(config.max_nan_skips >= 0, 'max_nan_skips', 'must be >= 0')
  _check(o.schedule in SCHEDULES, 'optimizer.schedule',
         f'{o.schedule!r} is not one of {SCHEDULES}')
  _check(o.learning_rate > 0, 'optimizer.learning_rate', 'must be positive')
  _check(0 <= o.warmup_steps <= config.steps, 'optimizer.warmup_steps',
         f'must be between 0 and steps={config.steps}, got {o.warmup_steps}')
  _check(isinstance(config.eval_batches, int) and config.eval_batches >= 0,
         'eval_batches', f'must be >= 0, got {config.eval_batches!r}')
  _check(0.0 <= o.min_lr_ratio <= 1.0, 'optimizer.min_lr_ratio',
         f'must be in [0, 1], got {o.min_lr_ratio}')
  _check(o.grad_clip >= 0, 'optimizer.grad_clip', 'must be >= 0 (0: off)')
  mesh = config.mesh
  others = mesh.fsdp * mesh.seq * mesh.tensor
  _check(num_devices % others == 0, 'mesh',
         f'fsdp={mesh.fsdp} x seq={mesh.seq} x tensor={mesh.tensor} = '
         f'{others} does not divide the {num_devices} devices')
  if mesh.seq > 1:
    _check(config.data.seq_len % (2 * mesh.seq) == 0, 'data.seq_len',
           f'{config.data.seq_len} is not divisible by 2 * mesh.seq = '
           f'{2 * mesh.seq} (zigzag ring attention)')
  _check(isinstance(m.loss_chunks, int) and m.loss_chunks >= 1 and
         config.data.seq_len % (m.loss_chunks * config.mesh.seq) == 0,
         'model.loss_chunks',
         f'{m.loss_chunks} x mesh.seq={config.mesh.seq} must divide '
         f'data.seq_len={config.data.seq_len}')
  _check(m.d_model % (mesh.fsdp * mesh.seq) == 0, 'mesh.fsdp',
         f'fsdp={mesh.fsdp} x seq={mesh.seq} (parameters are sharded over '
         f'both) does not divide model.d_model={m.d_model}')
  for key in ('n_head', 'vocab_size'):
    _check(m[key] % mesh.tensor == 0, 'mesh.tensor',
           f'{mesh.tensor} does not divide model.{key}={m[key]}')
  data_parallel = num_devices // (mesh.seq * mesh.tensor)  # data x fsdp
  _check(config.batch_size % data_parallel == 0, 'batch_size',
         f'{config.batch_size} is not divisible by the {data_parallel} '
         'devices of the data and fsdp axes')
  micro = config.micro_batch_size
  _check(isinstance(micro, int) and micro >= 0, 'micro_batch_size',
         f'must be a non-negative integer, got {micro!r}')
  if micro:
    per_device = config.batch_size // data_parallel
    _check(per_device % micro == 0, 'micro_batch_size',
           f'{micro} does not divide the {per_device} sequences per device '
           f'(batch_size={config.batch_size} over {data_parallel} '
           'data-parallel devices)')
  _check(config.data.prefetch >= 0, 'data.prefetch', 'must be >= 0')
  profile_range(config)
  if config.data.dataset != 'sample':
    # Imported here: slow to import, and train.py reads its flags first.
    from jaxflash.data import prepare  # pylint: disable=g-import-not-at-top
    try:
      prepare.read_meta(config.data.data_dir, config.data.dataset)
    except FileNotFoundError as e:
      raise ConfigError('data.dataset', str(e)) from None


def _check_flash_head_dim(config):
  """The Pallas kernel's own input check, on the model's q, k and v."""
  # Imported here: train.py reads its flags before JAX loads, and resolve_impl
  # asks for the backend, which must wait for jax.distributed.
  # pylint: disable=g-import-not-at-top
  import jax
  from jaxflash.attention import resolve_impl
  from kernels.flash_attention import check_qkv
  # pylint: enable=g-import-not-at-top
  m = config.model
  if resolve_impl(m.attention_impl) != 'flash':
    return
  head_dim = m.d_model // m.n_head
  qkv = jax.ShapeDtypeStruct((1, config.data.seq_len, m.n_head, head_dim),
                             m.dtype)
  try:
    check_qkv(qkv, qkv, qkv)
  except ValueError as e:
    raise ConfigError(
        'model.n_head', f'model.d_model={m.d_model} / n_head={m.n_head} gives '
        f'head_dim {head_dim}, which flash attention cannot run ({e}); choose '
        'another n_head, or model.attention_impl=xla') from None


def profile_range(config):
  """(first, last) steps of config.profile_steps, or None when it is ''."""
  spec = config.profile_steps
  if not spec:
    return None
  first, _, last = spec.partition(':')
  _check(first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last),
         'profile_steps', f"expected 'A:B' with 1 <= A <= B, got {spec!r}")
  return int(first), int(last)


def accumulation_steps(config, num_devices):
  """Microbatches per optimizer step (1 when micro_batch_size is 0)."""
  if not config.micro_batch_size:
    return 1
  data_parallel = num_devices // (config.mesh.seq * config.mesh.tensor)
  return config.batch_size // (config.micro_batch_size * data_parallel)
