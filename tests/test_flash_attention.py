"""FlashAttention-2 kernels against the float32 reference (CPU, interpret mode).

Interpret mode starts every kernel output as NaN and pads reads past an array
with NaN, so an unwritten tile or an unmasked read shows up as NaN; every check
asserts no NaN. Small blocks (16/32) give many blocks and ragged tails cheaply.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np
import pytest

from kernels.flash_attention import (BlockSizes, flash_attention,
                                     flash_attention_bwd, flash_attention_fwd)
from kernels.reference import attention_mask, reference_attention

pytestmark = pytest.mark.filterwarnings(
    'ignore:The Pallas Triton backend is deprecated:DeprecationWarning')

SMALL = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16,
                   block_q_dq=32, block_k_dq=16)
# Relative L2 error allowed against the float32 reference.
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3, jnp.float32: 1e-4}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int
  seq_q: int
  seq_kv: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  dtype: type = jnp.bfloat16
  segments: str | None = None  # None, 'one' array, or a 'pair'

  def __str__(self):
    return (f'b{self.batch}_q{self.seq_q}_k{self.seq_kv}_h{self.heads}'
            f'kv{self.kv_heads}_d{self.head_dim}'
            f'{"_causal" if self.causal else ""}_{jnp.dtype(self.dtype).name}'
            f'{"_seg-" + self.segments if self.segments else ""}')


def _random_cases(n, seed=0):
  """Shapes drawn at random (fixed seed, so failures reproduce)."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    kv_heads = int(rng.choice([1, 2]))
    seq_q = int(rng.integers(1, 90))
    segments = rng.choice([None, 'one', 'pair'])
    seq_kv = seq_q if segments == 'one' else int(rng.integers(1, 90))
    cases.append(Case(
        batch=int(rng.integers(1, 3)), seq_q=seq_q, seq_kv=seq_kv,
        heads=kv_heads * int(rng.choice([1, 2, 3])), kv_heads=kv_heads,
        head_dim=int(rng.choice([32, 64, 80, 96, 128])),
        causal=bool(rng.integers(2)),
        dtype=rng.choice([jnp.bfloat16, jnp.float16, jnp.float32]),
        segments=segments))
  return cases


CASES = [
    Case(2, 17, 17, 2, 2, 64, False),
    Case(1, 1, 1, 2, 2, 32, True, jnp.float16),
    Case(1, 200, 200, 2, 1, 128, True),                        # MQA, 200
    Case(1, 40, 40, 2, 2, 80, True, segments='one'),
    Case(2, 33, 33, 4, 2, 96, False, jnp.float16),             # GQA
    Case(1, 24, 24, 2, 2, 256, True),
    Case(1, 24, 56, 4, 2, 64, True),                           # seq_q < seq_kv
    Case(1, 56, 24, 2, 2, 32, True, jnp.float32),              # seq_q > seq_kv
    Case(2, 48, 40, 4, 1, 64, False, jnp.float32, 'pair'),
    Case(1, 64, 64, 2, 2, 128, False, jnp.float32),            # no tails
    Case(2, 64, 64, 4, 2, 80, True, jnp.float16, 'one'),
    Case(1, 17, 40, 2, 2, 32, False),
] + _random_cases(4)


def _inputs(case, key):
  kq, kk, kv, ko, kl, ks = jax.random.split(key, 6)
  q = jax.random.normal(kq, (case.batch, case.seq_q, case.heads,
                             case.head_dim), jnp.float32)
  kv_shape = (case.batch, case.seq_kv, case.kv_heads, case.head_dim)
  k = jax.random.normal(kk, kv_shape, jnp.float32)
  v = jax.random.normal(kv, kv_shape, jnp.float32)
  do = jax.random.normal(ko, q.shape, jnp.float32)
  dlse = jax.random.normal(kl, (case.batch, case.heads, case.seq_q))
  segment_ids = None
  if case.segments:
    # Packed documents: sorted ids. For a pair, q ids run one past kv's, so
    # some queries may have no key at all.
    seg_q = jnp.sort(jax.random.randint(ks, (case.batch, case.seq_q), 0, 4), 1)
    if case.segments == 'one':
      segment_ids = seg_q
    else:
      seg_kv = jnp.sort(jax.random.randint(jax.random.fold_in(ks, 1),
                                           (case.batch, case.seq_kv), 0, 3), 1)
      segment_ids = (seg_q, seg_kv)
  cast = lambda x: x.astype(case.dtype)
  return cast(q), cast(k), cast(v), do, dlse, segment_ids


def _has_empty_rows(case, segment_ids, seq_q, seq_kv):
  if isinstance(segment_ids, tuple):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  mask = attention_mask(seq_q, seq_kv, causal=case.causal, q_segment_ids=q_seg,
                        kv_segment_ids=kv_seg)
  return bool(jnp.any(~jnp.any(mask, axis=-1)))


def _check(name, got, want, tol):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, name
  assert not np.isnan(got).any(), f'{name}: NaN (unwritten tile?)'
  finite = np.isfinite(want)
  np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=name)
  diff = np.linalg.norm(got[finite] - want[finite])
  scale = np.linalg.norm(want[finite]) + 1e-6
  assert diff <= tol * scale, f'{name}: relative error {diff / scale:.2e}'


def _loss(attention, q, k, v, do, dlse, with_lse):
  o, lse = attention(q, k, v)
  loss = jnp.sum(o.astype(jnp.float32) * do)
  if with_lse:
    loss += jnp.sum(lse * dlse)
  return loss, (o, lse)


def check_with_grads(ours, q, k, v, do, dlse, *, with_lse, tol, lse_tol,
                     **kwargs):
  """ours(q, k, v, **kwargs) against the reference: out, lse, and dq, dk, dv
  of sum(out * do) (+ sum(lse * dlse) if with_lse)."""
  results = []
  for attention in (ours, reference_attention):
    attention = functools.partial(attention, return_lse=True, **kwargs)
    grad_fn = jax.value_and_grad(_loss, argnums=(1, 2, 3), has_aux=True)
    results.append(jax.jit(grad_fn, static_argnums=(0, 6))(
        attention, q, k, v, do, dlse, with_lse))
  ((_, (o, lse)), grads), ((_, (o_ref, lse_ref)), grads_ref) = results
  _check('out', o, o_ref, tol)
  _check('lse', lse, lse_ref, lse_tol)
  for name, g, g_ref in zip(('dq', 'dk', 'dv'), grads, grads_ref):
    _check(name, g, g_ref, tol)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_matches_reference(case):
  key = jax.random.fold_in(jax.random.PRNGKey(0), hash(str(case)) % 2**31)
  q, k, v, do, dlse, segment_ids = _inputs(case, key)
  # The lse cotangent is checked where every row sees some key (elsewhere
  # lse = -inf and its gradient is not defined).
  with_lse = not _has_empty_rows(case, segment_ids, case.seq_q, case.seq_kv)
  ours = functools.partial(flash_attention, interpret=True, block_sizes=SMALL)
  check_with_grads(ours, q, k, v, do, dlse, with_lse=with_lse,
                   tol=TOL[case.dtype], lse_tol=1e-5, causal=case.causal,
                   segment_ids=segment_ids)


def test_bwd_piece_matches_reference_vjp():
  case = Case(2, 40, 56, 4, 2, 64, True, jnp.float16)
  q, k, v, do, dlse, _ = _inputs(case, jax.random.PRNGKey(1))
  do = do.astype(case.dtype)
  ref = lambda q, k, v: reference_attention(q, k, v, causal=True,
                                            return_lse=True)
  (o, lse), vjp = jax.vjp(ref, q, k, v)
  want = vjp((do, dlse))
  got = flash_attention_bwd(q, k, v, o, lse, do, dlse=dlse, causal=True,
                            interpret=True, block_sizes=SMALL)
  for name, g, g_ref in zip(('dq', 'dk', 'dv'), got, want):
    _check(name, g, g_ref, TOL[case.dtype])


def test_ring_attention_pieces():
  """Two K/V chunks: fwd pieces merge by lse, and bwd pieces fed the global
  (o, lse, dO) sum to the full gradients, with queries that see no key of a
  chunk (segments)."""
  case = Case(1, 40, 64, 2, 1, 32, False, jnp.float32, 'pair')
  q, k, v, do, _, (q_seg, kv_seg) = _inputs(case, jax.random.PRNGKey(2))
  kwargs = dict(interpret=True, block_sizes=SMALL)
  chunks = [slice(0, 24), slice(24, 64)]
  parts = [flash_attention_fwd(q, k[:, c], v[:, c],
                               segment_ids=(q_seg, kv_seg[:, c]), **kwargs)
           for c in chunks]
  lse = jnp.logaddexp(parts[0][1], parts[1][1])
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  o = sum(o_i * jnp.exp(lse_i - safe).transpose(0, 2, 1)[..., None]
          for o_i, lse_i in parts)
  ref = lambda q, k, v: reference_attention(q, k, v,
                                            segment_ids=(q_seg, kv_seg))
  o_ref, vjp = jax.vjp(ref, q, k, v)
  _check('out', o, o_ref, 1e-5)
  dq_ref, dk_ref, dv_ref = vjp(do)
  grads = [flash_attention_bwd(q, k[:, c], v[:, c], o_ref, lse, do,
                               segment_ids=(q_seg, kv_seg[:, c]), **kwargs)
           for c in chunks]
  _check('dq', grads[0][0] + grads[1][0], dq_ref, 1e-4)
  _check('dk', jnp.concatenate([g[1] for g in grads], 1), dk_ref, 1e-4)
  _check('dv', jnp.concatenate([g[2] for g in grads], 1), dv_ref, 1e-4)


def test_interpret_mode_poisons_outputs():
  """The NaN checks above rely on this: an output tile nobody writes is NaN."""
  def kernel(o_ref):
    o_ref[pl.ds(0, 8)] = jnp.ones((8,), jnp.float32)

  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,),
                                                              jnp.float32),
                       interpret=True)()
  assert np.all(np.asarray(out[:8]) == 1) and np.all(np.isnan(out[8:]))


def _arrays(q=(1, 8, 2, 64), k=(1, 8, 2, 64), v=None, dtype=jnp.bfloat16):
  return (jnp.ones(q, dtype), jnp.ones(k, dtype),
          jnp.ones(v or k, dtype))


BAD_INPUTS = [
    ('q rank', dict(q=(8, 2, 64)), {}, r'q: expected rank 4'),
    ('k rank', dict(k=(1, 8, 2, 64, 1)), {}, r'k: expected rank 4'),
    ('batch', dict(k=(2, 8, 2, 64)), {}, r'k: batch'),
    ('head_dim', dict(k=(1, 8, 2, 32)), {}, r'head_dim'),
    ('k/v seq', dict(v=(1, 9, 2, 64)), {}, r'k and v'),
    ('head_dim 512', dict(q=(1, 8, 2, 512), k=(1, 8, 2, 512)), {},
     r'head_dim: 512 not supported'),
    ('head_dim 20', dict(q=(1, 8, 2, 20), k=(1, 8, 2, 20)), {},
     r'head_dim: 20 not supported'),
    ('heads', dict(q=(1, 8, 3, 64)), {}, r'heads: q heads \(3\)'),
    ('dtype int', dict(dtype=jnp.int32), {}, r'q: dtype int32'),
    ('segment shape', {}, dict(segment_ids=jnp.zeros((1, 7), jnp.int32)),
     r'segment_ids'),
    ('segment seq', dict(k=(1, 9, 2, 64)),
     dict(segment_ids=jnp.zeros((1, 8), jnp.int32)), r'segment_ids'),
    ('segment pair shape', dict(k=(1, 9, 2, 64)),
     dict(segment_ids=(jnp.zeros((1, 8), jnp.int32),
                       jnp.zeros((1, 8), jnp.int32))), r'segment_ids: kv'),
    ('segment dtype', {}, dict(segment_ids=jnp.zeros((1, 8))),
     r'segment_ids: q segment ids must be integers'),
    ('block_sizes', {}, dict(block_sizes=BlockSizes(block_q=48)),
     r'block_sizes: block_q=48'),
    ('sm_scale', {}, dict(sm_scale=-1.0), r'sm_scale'),
]


@pytest.mark.parametrize('shapes,kwargs,match', [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(shapes, kwargs, match):
  q, k, v = _arrays(**shapes)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, interpret=True, **kwargs)


def test_bad_input_dtype_mismatch():
  q, k, v = _arrays()
  with pytest.raises(ValueError, match='dtypes differ'):
    flash_attention(q, k.astype(jnp.float16), v, interpret=True)


def test_bad_input_bwd_lse_shape():
  q, k, v = _arrays()
  with pytest.raises(ValueError, match='lse: expected shape'):
    flash_attention_bwd(q, k, v, q, jnp.zeros((1, 8, 2)), q, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
@pytest.mark.parametrize('case', [Case(2, 1000, 1000, 4, 2, 80, True),
                                  Case(1, 512, 384, 2, 2, 128, False,
                                       jnp.float16, 'pair'),
                                  Case(1, 300, 300, 4, 1, 256, True),
                                  Case(2, 257, 257, 4, 4, 64, True,
                                       segments='one')], ids=str)
def test_gpu_matches_reference(case):
  q, k, v, do, dlse, segment_ids = _inputs(case, jax.random.PRNGKey(3))
  with_lse = not _has_empty_rows(case, segment_ids, case.seq_q, case.seq_kv)
  check_with_grads(flash_attention, q, k, v, do, dlse, with_lse=with_lse,
                   tol=TOL[case.dtype], lse_tol=1e-4, causal=case.causal,
                   segment_ids=segment_ids)
