"""FlashAttention-2 in Pallas: public API over two backends.

backend='triton': the Pallas Triton kernels (flash_triton*.py), any GPU, any
shape check_qkv accepts. backend='mosaic': the Hopper kernels in Pallas Mosaic
GPU (flash_mosaic*.py), warp-specialized with TMA and wgmma; narrower shapes
(flash_mosaic.unsupported). backend='auto': mosaic on a compute capability 9.x
GPU for the shapes it supports, triton otherwise. Either backward takes any
forward's o and lse.

flash_attention is differentiable (jax.custom_vjp, also through lse).
flash_attention_fwd / flash_attention_bwd run one forward or backward on their
own, for ring attention: the backward takes any (o, lse, dO), e.g. the global
ones of a query chunk against one K/V chunk.
Layout as jax.nn.dot_product_attention: q [batch, seq_q, heads, head_dim],
k/v [batch, seq_kv, kv_heads, head_dim]; lse float32 [batch, heads, seq_q].
interpret=True runs the kernels on CPU (Pallas interpret mode, which also
starts every output as NaN, so a tile left unwritten shows up in tests; with
backend='mosaic', Mosaic GPU's interpret mode).
"""
import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from kernels import flash_mosaic
from kernels import flash_mosaic_vjp
from kernels import flash_triton
from kernels import flash_triton_vjp
from kernels.flash_mosaic import MosaicConfig
from kernels.flash_mosaic_vjp import MosaicBwdConfig
from kernels.flash_triton import BlockSizes
from kernels.reference import split_segment_ids

MAX_HEAD_DIM = 256
# Names of the forward's saved output and lse, for remat policies that keep
# them so a rematerialized layer never re-runs the attention forward.
RESIDUAL_NAMES = ('attention_out', 'attention_lse')
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
BACKENDS = ('triton', 'mosaic', 'auto')
# 'auto': the Mosaic kernels pass their GPU tests (tests/test_flash_mosaic.py,
# marked gpu) and train GPT-3 2.7B 3% faster than Triton on an H200
# (benchmarks/results/train_throughput_NVIDIA_H200.json, 2026-12-01).
DEFAULT_BACKEND = 'auto'


def check_qkv(q, k, v):
  """Raises ValueError naming what the kernels cannot run; takes arrays or
  jax.ShapeDtypeStructs, so configs are checked before anything compiles."""
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name}: expected rank 4 [batch, seq, heads, head_dim],'
                       f' got shape {getattr(x, "shape", None)}')
  if k.shape != v.shape:
    raise ValueError(f'k and v: shapes differ, {k.shape} vs {v.shape}')
  batch, _, heads, head_dim = q.shape
  if k.shape[0] != batch:
    raise ValueError(f'k: batch {k.shape[0]} != q batch {batch}')
  if k.shape[3] != head_dim:
    raise ValueError(f'k: head_dim {k.shape[3]} != q head_dim {head_dim}')
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'q, k, v: dtypes differ ({q.dtype}, {k.dtype}, '
                     f'{v.dtype})')
  if q.dtype not in _DTYPES:
    raise ValueError(f'q: dtype {q.dtype} not supported; use bfloat16, '
                     'float16 or float32')
  if not (16 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
    raise ValueError(f'head_dim: {head_dim} not supported; need a multiple of'
                     f' 8 in [16, {MAX_HEAD_DIM}]')
  if k.shape[2] == 0 or heads % k.shape[2]:
    raise ValueError(f'heads: q heads ({heads}) must be a multiple of k/v heads'
                     f' ({k.shape[2]})')
  if q.shape[1] == 0 or k.shape[1] == 0:
    raise ValueError(f'seq: empty sequence (q {q.shape}, k {k.shape})')


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
  """The Mosaic kernels' knobs: fwd (MosaicConfig) and bwd (MosaicBwdConfig);
  None picks the measured default."""
  fwd: MosaicConfig | None = None
  bwd: MosaicBwdConfig | None = None

  def block_k(self, head_dim):
    """The largest key block the kernels step by: seq_kv must be a multiple
    (the default forward takes 128 keys where 256 do not divide seq_kv)."""
    # The default backward's key block does not depend on the mask.
    bwd = self.bwd or MosaicBwdConfig.default(head_dim, causal=False)
    return max(self.fwd.block_k if self.fwd else 128,
               flash_mosaic_vjp.BLOCK_K, 0 if bwd.fused else bwd.block_k)


def _check_segments(segment_ids, q, k):
  batch, seq_q, seq_kv = q.shape[0], q.shape[1], k.shape[1]
  if isinstance(segment_ids, (tuple, list)) and len(segment_ids) != 2:
    raise ValueError('segment_ids: expected one array or a pair (q, kv), got '
                     f'{len(segment_ids)} items')
  q_seg, kv_seg = split_segment_ids(segment_ids, seq_q, seq_kv)
  if q_seg is None:
    if kv_seg is not None:
      raise ValueError('segment_ids: got kv segment ids without q ones')
    return None, None
  for name, x, seq in (('q', q_seg, seq_q), ('kv', kv_seg, seq_kv)):
    if getattr(x, 'shape', None) != (batch, seq):
      raise ValueError(f'segment_ids: {name} segment ids must have shape '
                       f'[batch, seq] = {(batch, seq)}, got '
                       f'{getattr(x, "shape", None)}')
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'segment_ids: {name} segment ids must be integers, '
                       f'got {x.dtype}')
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check_block_sizes(block_sizes, q, k, causal):
  if block_sizes is None:
    return BlockSizes.default(q.shape[-1], k.shape[1], causal)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f'block_sizes: expected BlockSizes, got {block_sizes!r}')
  for name in ('block_q', 'block_k', 'block_q_dkv', 'block_k_dkv',
               'block_q_dq', 'block_k_dq'):
    size = getattr(block_sizes, name)
    if size < flash_triton.MIN_BLOCK or size & (size - 1):
      raise ValueError(f'block_sizes: {name}={size} must be a power of two '
                       f'>= {flash_triton.MIN_BLOCK}')
  return block_sizes


def _on_hopper():
  device = jax.devices()[0]
  return (device.platform == 'gpu' and
          str(getattr(device, 'compute_capability', '')).startswith('9.'))


def _choose_backend(backend, q, k, has_segments, block_sizes,
                    mosaic_config=None):
  """'triton' or 'mosaic', for the forward and the backward alike (the Mosaic
  kernels of both directions support the same shapes)."""
  if backend not in BACKENDS:
    raise ValueError(f'backend: expected one of {BACKENDS}, got {backend!r}')
  if mosaic_config is not None and not isinstance(mosaic_config,
                                                  MosaicTuning):
    raise ValueError(f'mosaic_config: expected MosaicTuning, got '
                     f'{mosaic_config!r}')
  if backend == 'triton':
    return 'triton'
  reason = flash_mosaic.unsupported(
      q, k, has_segments=has_segments,
      block_k=(mosaic_config or MosaicTuning()).block_k(q.shape[-1]))
  if backend == 'mosaic':
    if block_sizes is not None:
      raise ValueError("block_sizes: Triton tiles; backend='mosaic' picks its"
                       ' own')
    if reason is not None:
      raise ValueError(f"backend='mosaic' {reason}; use backend='triton' or "
                       "'auto'")
    return 'mosaic'
  # auto: tiles given for the Triton kernels mean the Triton kernels.
  use_mosaic = reason is None and block_sizes is None and _on_hopper()
  return 'mosaic' if use_mosaic else 'triton'


def _config(q, k, v, segment_ids, *, causal, sm_scale, interpret,
            block_sizes, backend, mosaic_config=None):
  """Validates everything from shapes, before anything compiles."""
  check_qkv(q, k, v)
  segments = _check_segments(segment_ids, q, k)
  backend = _choose_backend(backend, q, k, segments[0] is not None,
                            block_sizes, mosaic_config)
  head_dim = q.shape[-1]
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
    raise ValueError(f'sm_scale: must be a positive Python number, got '
                     f'{sm_scale!r}')
  config = dict(causal=bool(causal), sm_scale=float(sm_scale),
                interpret=bool(interpret),
                block_sizes=_check_block_sizes(block_sizes, q, k, causal),
                backend=backend,
                mosaic_config=mosaic_config or MosaicTuning())
  return segments, config


_STATIC = ('causal', 'sm_scale', 'interpret', 'block_sizes', 'backend',
           'mosaic_config')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _fwd(q, k, v, q_seg, kv_seg, *, backend, block_sizes, mosaic_config,
         **config):
  if backend == 'mosaic':
    return flash_mosaic.flash_fwd(q, k, v, config=mosaic_config.fwd, **config)
  return flash_triton.flash_fwd(q, k, v, q_seg, kv_seg,
                                block_sizes=block_sizes, **config)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _bwd(q, k, v, o, lse, do, dlse, q_seg, kv_seg, *, backend, block_sizes,
         mosaic_config, **config):
  if backend == 'mosaic':
    return flash_mosaic_vjp.flash_bwd(q, k, v, o, lse, do, dlse,
                                      config=mosaic_config.bwd, **config)
  return flash_triton_vjp.flash_bwd(q, k, v, o, lse, do, dlse, q_seg, kv_seg,
                                    block_sizes=block_sizes, **config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _attention(q, k, v, q_seg, kv_seg, causal, sm_scale, interpret,
               block_sizes, backend, mosaic_config):
  return _fwd(q, k, v, q_seg, kv_seg, causal=causal, sm_scale=sm_scale,
              interpret=interpret, block_sizes=block_sizes, backend=backend,
              mosaic_config=mosaic_config)


def _attention_fwd(q, k, v, q_seg, kv_seg, causal, sm_scale, interpret,
                   block_sizes, backend, mosaic_config):
  o, lse = _attention(q, k, v, q_seg, kv_seg, causal, sm_scale, interpret,
                      block_sizes, backend, mosaic_config)
  o, lse = (checkpoint_name(x, name) for x, name in zip((o, lse),
                                                         RESIDUAL_NAMES))
  return (o, lse), (q, k, v, q_seg, kv_seg, o, lse)


def _attention_bwd(causal, sm_scale, interpret, block_sizes, backend,
                   mosaic_config, residuals, cotangents):
  q, k, v, q_seg, kv_seg, o, lse = residuals
  do, dlse = cotangents
  dq, dk, dv = _bwd(q, k, v, o, lse, do, dlse, q_seg, kv_seg, causal=causal,
                    sm_scale=sm_scale, interpret=interpret,
                    block_sizes=block_sizes, backend=backend,
                    mosaic_config=mosaic_config)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, causal=False, sm_scale=None, segment_ids=None,
                    return_lse=False, interpret=False, block_sizes=None,
                    backend=DEFAULT_BACKEND, mosaic_config=None):
  """Softmax attention, FlashAttention-2 style; see kernels/reference.py.

  Args:
    q: [batch, seq_q, heads, head_dim], bfloat16, float16 or float32.
    k, v: [batch, seq_kv, kv_heads, head_dim]; heads % kv_heads == 0 (GQA/MQA).
    causal: query i sees key j iff j <= i + seq_kv - seq_q.
    sm_scale: softmax scale, default 1/sqrt(head_dim).
    segment_ids: [batch, seq] ints (seq_q == seq_kv) or a pair
      (q_segment_ids, kv_segment_ids); attention only within a segment.
    return_lse: also return lse, float32 [batch, heads, seq_q] (differentiable).
    interpret: run the kernels in Pallas interpret mode (CPU).
    block_sizes: BlockSizes of the Triton kernels; default
      BlockSizes.default(head_dim, seq_kv, causal).
    backend: 'triton', 'mosaic' (Hopper; ValueError naming the limit for
      shapes it cannot run) or 'auto' (the default: mosaic where it can run
      on a 9.x GPU, triton elsewhere).
    mosaic_config: MosaicTuning, the Mosaic kernels' knobs; default the
      measured ones.

  Returns:
    out like q, or (out, lse). Rows that see no key give out = 0, lse = -inf.
  """
  (q_seg, kv_seg), config = _config(
      q, k, v, segment_ids, causal=causal, sm_scale=sm_scale,
      interpret=interpret, block_sizes=block_sizes, backend=backend,
      mosaic_config=mosaic_config)
  o, lse = _attention(q, k, v, q_seg, kv_seg, config['causal'],
                      config['sm_scale'], config['interpret'],
                      config['block_sizes'], config['backend'],
                      config['mosaic_config'])
  return (o, lse) if return_lse else o


def flash_attention_fwd(q, k, v, *, causal=False, sm_scale=None,
                        segment_ids=None, interpret=False, block_sizes=None,
                        backend=DEFAULT_BACKEND, mosaic_config=None):
  """The forward kernel alone: (out, lse); not differentiable."""
  (q_seg, kv_seg), config = _config(
      q, k, v, segment_ids, causal=causal, sm_scale=sm_scale,
      interpret=interpret, block_sizes=block_sizes, backend=backend,
      mosaic_config=mosaic_config)
  return _fwd(q, k, v, q_seg, kv_seg, **config)


def flash_attention_bwd(q, k, v, o, lse, do, *, dlse=None, causal=False,
                        sm_scale=None, segment_ids=None, interpret=False,
                        block_sizes=None, backend=DEFAULT_BACKEND,
                        mosaic_config=None):
  """The backward kernels alone: (dq, dk, dv) of attention(q, k, v).

  o, lse and do may be the global ones of a query chunk (ring attention): P is
  recomputed as exp(q.k * sm_scale - lse) over this K/V only. dlse, float32
  [batch, heads, seq_q], is the cotangent of lse, if any.
  """
  (q_seg, kv_seg), config = _config(
      q, k, v, segment_ids, causal=causal, sm_scale=sm_scale,
      interpret=interpret, block_sizes=block_sizes, backend=backend,
      mosaic_config=mosaic_config)
  lse_shape = (q.shape[0], q.shape[2], q.shape[1])
  for name, x, shape in (('o', o, q.shape), ('do', do, q.shape),
                         ('lse', lse, lse_shape), ('dlse', dlse, lse_shape)):
    if x is not None and getattr(x, 'shape', None) != shape:
      raise ValueError(f'{name}: expected shape {shape}, got '
                       f'{getattr(x, "shape", None)}')
  return _bwd(q, k, v, o, lse, do, dlse, q_seg, kv_seg, **config)
