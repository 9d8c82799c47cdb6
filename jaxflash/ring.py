"""Ring attention over one mesh axis (DistFlashAttn mode), with shard_map.

Each of the N devices on `seq_axis` holds one chunk of q and of k/v. At each of
N steps a device attends its queries to the K/V chunk it holds while
`ppermute` passes that chunk on to the next device; partial outputs merge in
float32 by their log-sum-exp. The backward pass runs one more ring from the
saved output and lse: dQ accumulates locally, dK/dV travel with their chunk and
arrive home after the last hop. The forward ring is never re-run.

Layouts of the sequence over the devices:
  'natural': device i holds chunk i. Causal work is unbalanced: device i
      computes i + 1 of the N blocks (blocks above the diagonal are skipped).
  'zigzag': the sequence is cut into 2N chunks and device i holds chunks i and
      2N-1-i, so with causal masking every device computes the same work at
      every step: after the diagonal step, one kernel call of two c x c blocks
      stacked on the batch axis (c = seq / 2N). A model keeps its activations in this order (`to_layout` on
      the tokens and positions once) and pays no per-layer reshuffle.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from kernels import flash_attention_bwd
from kernels import flash_attention_fwd
from kernels import reference_attention
from kernels import reference_attention_bwd
from kernels.flash_attention import DEFAULT_BACKEND
from kernels.flash_attention import RESIDUAL_NAMES

LAYOUTS = ('natural', 'zigzag')
BLOCK_IMPLS = ('xla', 'flash')


def layout_permutation(seq_len, num_devices, layout):
  """Indices into the natural sequence, in the order the layout stores it."""
  if layout == 'natural':
    return np.arange(seq_len)
  chunks = np.arange(seq_len).reshape(2 * num_devices, -1)
  order = [c for i in range(num_devices) for c in (i, 2 * num_devices - 1 - i)]
  return chunks[order].reshape(-1)


def to_layout(x, num_devices, layout, axis=1):
  """Reorders a natural-order sequence axis into `layout`."""
  perm = layout_permutation(x.shape[axis], num_devices, layout)
  return jnp.take(x, perm, axis=axis)


def from_layout(x, num_devices, layout, axis=1):
  """Inverse of to_layout."""
  perm = layout_permutation(x.shape[axis], num_devices, layout)
  return jnp.take(x, np.argsort(perm), axis=axis)


def computed_blocks(num_devices, layout, causal):
  """[step, device] -> attention work the ring schedules, in units of c x c.

  c = seq / (2N): a full chunk-by-chunk block is 4 units, a causal diagonal
  block 2 (its upper triangle is skipped). Read off the same schedule that
  the ring runs, for tests and benchmarks of the balance.
  """
  work = np.zeros((num_devices, num_devices), dtype=int)
  for t in range(num_devices):
    for i in range(num_devices):
      case = int(_step_case(t, i, num_devices, layout, causal))
      work[t, i] = _CASE_WORK[case]
  return work


TENSOR_AXIS = 'tensor'  # shards heads, where the mesh has it


def batch_axes(mesh, seq_axis):
  """The mesh axes that shard the batch: all but seq_axis and 'tensor'."""
  return tuple(a for a in mesh.axis_names
               if a not in (seq_axis, TENSOR_AXIS)) or None


def _validate(q, k, v, mesh, seq_axis, layout, segment_ids):
  if seq_axis not in mesh.axis_names:
    raise ValueError(f'seq_axis: mesh has no axis {seq_axis!r} (axes: '
                     f'{mesh.axis_names})')
  if layout not in LAYOUTS:
    raise ValueError(f'layout: {layout!r} is not one of {LAYOUTS}')
  for name, x in (('q', q), ('k', k), ('v', v)):
    if x.ndim != 4:
      raise ValueError(f'{name}: expected [batch, seq, heads, head_dim], got '
                       f'shape {x.shape}')
  if k.shape != v.shape or k.shape[:2] != q.shape[:2] or (
      k.shape[3] != q.shape[3]):
    raise ValueError(f'q, k, v: shapes {q.shape}, {k.shape}, {v.shape} do not '
                     'fit ([batch, seq, heads, head_dim]; same batch, seq and '
                     'head_dim)')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'heads: q heads ({q.shape[2]}) must be a multiple of '
                     f'k/v heads ({k.shape[2]})')
  n = mesh.shape[seq_axis]
  chunks = 2 * n if layout == 'zigzag' else n
  if q.shape[1] % chunks:
    raise ValueError(f'seq: {q.shape[1]} is not divisible by {chunks} '
                     f'({layout} layout over {n} devices of {seq_axis!r})')
  tensor = mesh.shape.get(TENSOR_AXIS, 1)
  if k.shape[2] % tensor:
    raise ValueError(f'heads: k/v heads ({k.shape[2]}) are not divisible by '
                     f'the {tensor} devices of {TENSOR_AXIS!r}')
  batch_shards = mesh.size // (n * tensor)
  if q.shape[0] % batch_shards:
    raise ValueError(f'batch: {q.shape[0]} is not divisible by the '
                     f'{batch_shards} devices of the other mesh axes')
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f'segment_ids: expected shape {q.shape[:2]}, got '
                     f'{segment_ids.shape}')


def _block_fwd(q, k, v, q_seg, kv_seg, *, causal, sm_scale, impl, backend):
  segments = None if q_seg is None else (q_seg, kv_seg)
  if impl == 'flash':
    o, lse = flash_attention_fwd(q, k, v, causal=causal, sm_scale=sm_scale,
                                 segment_ids=segments, backend=backend,
                                 interpret=jax.default_backend() != 'gpu')
  else:
    o, lse = reference_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                 segment_ids=segments, return_lse=True)
  return o.astype(jnp.float32), lse


def _block_bwd(q, k, v, o, lse, do, q_seg, kv_seg, *, causal, sm_scale, impl,
               backend):
  segments = None if q_seg is None else (q_seg, kv_seg)
  fn = flash_attention_bwd if impl == 'flash' else reference_attention_bwd
  kwargs = ({'interpret': jax.default_backend() != 'gpu', 'backend': backend}
            if impl == 'flash' else {})
  grads = fn(q, k, v, o, lse, do, causal=causal, sm_scale=sm_scale,
             segment_ids=segments, **kwargs)
  return tuple(g.astype(jnp.float32) for g in grads)


def _merge(o_a, lse_a, o_b, lse_b):
  """Combines two partial softmax results over disjoint keys."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  # [batch, heads, seq] -> [batch, seq, heads, 1] to scale the outputs.
  weight = lambda l: jnp.exp(l - safe).transpose(0, 2, 1)[..., None]
  return o_a * weight(lse_a) + o_b * weight(lse_b), lse


def _halves(x, axis):
  half = x.shape[axis] // 2
  return (jax.lax.slice_in_dim(x, 0, half, axis=axis),
          jax.lax.slice_in_dim(x, half, 2 * half, axis=axis))


# Units of c x c for each case of _step_case.
_CASE_WORK = (2, 4, 0, 2, 2)
_EARLIER = 3


def _step_case(t, i, n, layout, causal):
  """Which block computation device i runs at step t (traced index i).

  0: the diagonal (causal), 1: full, 2: skip (natural, above the diagonal),
  3: zigzag, K/V from an earlier device: q all vs k first half,
  4: zigzag, K/V from a later device: q second half vs k all.
  """
  if not causal:
    return 1
  if t == 0:
    return 0
  j = (i - t) % n
  if layout == 'natural':
    return jnp.where(j < i, 1, 2)
  return jnp.where(j < i, 3, 4)


# A zigzag step against another device's K/V is two c x c blocks. Cases 3 and
# 4 share (q second half, k first half); the other block is (q first, k first)
# for K/V from an earlier device, (q second, k second) from a later one.
# Stacked on the batch axis they make one kernel call of the same shape on
# every device at every step, so no device waits for another at a hop and no
# branch sits between the kernels and the transfers.
_Q_SHARED, _K_SHARED = 1, 0


def _stack_blocks(earlier, x, shared, axis=1):
  """x's halves as the two blocks see them: [shared half; picked half]."""
  halves = _halves(x, axis)
  return jnp.concatenate([halves[shared],
                          jnp.where(earlier, halves[0], halves[1])])


def _split_blocks(earlier, x, zero):
  """The two blocks' results -> (shared, to the first half, to the second)."""
  shared, other = jnp.split(x, 2)
  return (shared, jnp.where(earlier, other, zero),
          jnp.where(earlier, zero, other))


def _zigzag_fwd(earlier, full, q, k, v, q_seg, kv_seg):
  """(o, lse) of the local queries against another device's K/V chunk."""
  qs, ks, vs = (_stack_blocks(earlier, x, s)
                for x, s in ((q, _Q_SHARED), (k, _K_SHARED), (v, _K_SHARED)))
  segs = ((None, None) if q_seg is None else
          (_stack_blocks(earlier, q_seg, _Q_SHARED),
           _stack_blocks(earlier, kv_seg, _K_SHARED)))
  o, lse = full(qs, ks, vs, *segs)
  o_shared, o1, o2 = _split_blocks(earlier, o, 0.0)
  lse_shared, lse1, lse2 = _split_blocks(earlier, lse, -jnp.inf)
  o2, lse2 = _merge(o_shared, lse_shared, o2, lse2)
  return (jnp.concatenate([o1, o2], axis=1),
          jnp.concatenate([lse1, lse2], axis=2))


def _zigzag_bwd(earlier, full, q, k, v, o, lse, do, q_seg, kv_seg):
  """(dq, dk, dv) of _zigzag_fwd, from the global o, lse and dO."""
  rows = lambda x, axis=1: _stack_blocks(earlier, x, _Q_SHARED, axis)
  keys = lambda x: _stack_blocks(earlier, x, _K_SHARED)
  segs = (None, None) if q_seg is None else (rows(q_seg), keys(kv_seg))
  dq, dk, dv = full(rows(q), keys(k), keys(v), rows(o), rows(lse, 2), rows(do),
                    *segs)
  dq_shared, dq1, dq2 = _split_blocks(earlier, dq, 0.0)

  def key_side(dx):
    shared, to_first, to_second = _split_blocks(earlier, dx, 0.0)
    return jnp.concatenate([shared + to_first, to_second], axis=1)
  return (jnp.concatenate([dq1, dq_shared + dq2], axis=1), key_side(dk),
          key_side(dv))


def _pass_on(x, axis, perm, communicate):
  return jax.lax.ppermute(x, axis, perm) if communicate else x


def _ring_fwd(q, k, v, q_seg, kv_seg, *, axis, n, causal, layout, sm_scale,
              impl, backend, communicate):
  i = jax.lax.axis_index(axis)
  block = functools.partial(_block_fwd, sm_scale=sm_scale, impl=impl,
                            backend=backend)
  b, s, h, d = q.shape
  empty = (jnp.zeros((b, s, h, d), jnp.float32),
           jnp.full((b, h, s), -jnp.inf, jnp.float32))

  def diagonal(q, k, v, q_seg, kv_seg):
    return block(q, k, v, q_seg, kv_seg, causal=True)

  def full(q, k, v, q_seg, kv_seg):
    return block(q, k, v, q_seg, kv_seg, causal=False)

  def skip(*_):
    return empty

  branches = (diagonal, full, skip)
  perm = [(src, (src + 1) % n) for src in range(n)]
  o, lse = empty
  kv = (k, v, kv_seg)
  for t in range(n):
    # Send the chunk on before computing on it, so the transfer overlaps.
    next_kv = _pass_on(kv, axis, perm, communicate) if t < n - 1 else None
    case = _step_case(t, i, n, layout, causal)
    args = (q, *kv[:2], q_seg, kv[2])
    if isinstance(case, int):
      o_t, lse_t = branches[case](*args)
    elif layout == 'zigzag':
      o_t, lse_t = _zigzag_fwd(case == _EARLIER, full, *args)
    else:
      o_t, lse_t = jax.lax.switch(case, branches, *args)
    o, lse = _merge(o, lse, o_t, lse_t)
    kv = next_kv
  return o.astype(q.dtype), lse


def _ring_bwd(q, k, v, o, lse, do, q_seg, kv_seg, *, axis, n, causal, layout,
              sm_scale, impl, backend, communicate):
  i = jax.lax.axis_index(axis)
  block = functools.partial(_block_bwd, sm_scale=sm_scale, impl=impl,
                            backend=backend)
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)

  def diagonal(q, k, v, o, lse, do, q_seg, kv_seg):
    return block(q, k, v, o, lse, do, q_seg, kv_seg, causal=True)

  def full(q, k, v, o, lse, do, q_seg, kv_seg):
    return block(q, k, v, o, lse, do, q_seg, kv_seg, causal=False)

  def skip(q, k, v, *_):
    return zeros(q), zeros(k), zeros(v)

  branches = (diagonal, full, skip)
  perm = [(src, (src + 1) % n) for src in range(n)]
  dq = zeros(q)
  kv = (k, v, kv_seg)
  dkv = (zeros(k), zeros(v))
  for t in range(n):
    next_kv = _pass_on(kv, axis, perm, communicate) if t < n - 1 else None
    case = _step_case(t, i, n, layout, causal)
    args = (q, *kv[:2], o, lse, do, q_seg, kv[2])
    if isinstance(case, int):
      grads = branches[case](*args)
    elif layout == 'zigzag':
      grads = _zigzag_bwd(case == _EARLIER, full, *args)
    else:
      grads = jax.lax.switch(case, branches, *args)
    dq = dq + grads[0]
    # dK/dV ride with their chunk; the N-th hop brings them home.
    dkv = _pass_on((dkv[0] + grads[1], dkv[1] + grads[2]), axis, perm,
                   communicate)
    kv = next_kv
  return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


def _local_attention(static, q, k, v, q_seg, kv_seg):
  return _ring_fwd(q, k, v, q_seg, kv_seg, **static)[0]


def _local_attention_fwd(static, q, k, v, q_seg, kv_seg):
  o, lse = _ring_fwd(q, k, v, q_seg, kv_seg, **static)
  # Named so a remat policy can keep them: then the backward never re-runs
  # the forward ring (DistFlashAttn's rematerialization-aware checkpointing).
  o, lse = (checkpoint_name(x, name) for x, name in zip((o, lse),
                                                         RESIDUAL_NAMES))
  return o, (q, k, v, o, lse, q_seg, kv_seg)


def _local_attention_bwd(static, residuals, do):
  q, k, v, o, lse, q_seg, kv_seg = residuals
  # The backward ring's hops and stacked blocks repeat the forward's exactly:
  # XLA's CSE would merge them, and a scheduler may run them early, either way
  # keeping every layer's N-1 received K/V chunks alive from the forward to
  # the backward (memory per device growing with N, not the local sequence).
  # Behind a barrier with dO they are new values that wait for the backward.
  q, k, v, q_seg, kv_seg, do = jax.lax.optimization_barrier(
      (q, k, v, q_seg, kv_seg, do))
  dq, dk, dv = _ring_bwd(q, k, v, o, lse, do, q_seg, kv_seg, **static)
  return dq, dk, dv, None, None


def _make_local(static):
  fn = jax.custom_vjp(functools.partial(_local_attention, static))
  fn.defvjp(functools.partial(_local_attention_fwd, static),
            functools.partial(_local_attention_bwd, static))
  return fn


def ring_attention(q, k, v, *, mesh, seq_axis='seq', causal=True,
                   sm_scale=None, segment_ids=None, layout='natural',
                   impl='xla', backend=DEFAULT_BACKEND,
                   communicate=True):
  """Exact attention of global [batch, seq, heads, head_dim] arrays.

  The sequence axis is sharded over the mesh axis `seq_axis` in `layout`
  order (see the module docstring; `to_layout` converts), the batch over the
  mesh's other axes. `impl` picks the per-block kernel: 'flash' (the Pallas
  FlashAttention-2 kernel, on the kernels' `backend`: 'triton', 'mosaic' or
  'auto') or 'xla' (the pure-JAX reference).
  communicate=False keeps every K/V chunk at home (wrong results, the same
  compute): benchmarks time it to show how much transfer time is hidden.
  """
  _validate(q, k, v, mesh, seq_axis, layout, segment_ids)
  if impl not in BLOCK_IMPLS:
    raise ValueError(f'impl: {impl!r} is not one of {BLOCK_IMPLS}')
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  n = mesh.shape[seq_axis]
  static = dict(axis=seq_axis, n=n, causal=causal, layout=layout,
                sm_scale=sm_scale, impl=impl, backend=backend,
                communicate=communicate)
  head_axis = TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names else None
  spec = P(batch_axes(mesh, seq_axis), seq_axis, head_axis)
  seg_spec = (P(batch_axes(mesh, seq_axis), seq_axis)
              if segment_ids is not None else None)
  local = _make_local(static)
  fn = jax.shard_map(
      lambda q, k, v, seg: local(q, k, v, seg, seg),
      mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
      check_vma=False)
  return fn(q, k, v, segment_ids)
