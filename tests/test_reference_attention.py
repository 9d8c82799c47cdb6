"""The reference attention against a naive per-row softmax in NumPy."""
import jax
import numpy as np
import pytest

from kernels import reference_attention
from kernels import reference_attention_bwd


def naive_attention(q, k, v, causal, sm_scale, segment_ids=None):
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  out = np.zeros((b, tq, h, d))
  for bi in range(b):
    for hi in range(h):
      kv_head = hi // (h // hk)
      for i in range(tq):
        scores = []
        for j in range(tk):
          visible = (not causal) or j <= i + tk - tq
          if segment_ids is not None:
            visible = visible and segment_ids[bi, i] == segment_ids[bi, j]
          scores.append(q[bi, i, hi] @ k[bi, j, kv_head] * sm_scale
                        if visible else -np.inf)
        scores = np.array(scores)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[bi, i, hi] = weights @ v[bi, :, kv_head]
  return out


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('tq,tk,h,hk', [(7, 7, 2, 2), (5, 9, 4, 2), (6, 6, 4, 1)])
def test_matches_naive_softmax(causal, tq, tk, h, hk):
  rng = np.random.default_rng(tq * 100 + tk * 10 + h + causal)
  q = rng.standard_normal((2, tq, h, 8)).astype(np.float32)
  k = rng.standard_normal((2, tk, hk, 8)).astype(np.float32)
  v = rng.standard_normal((2, tk, hk, 8)).astype(np.float32)
  out = reference_attention(q, k, v, causal=causal, sm_scale=0.3)
  np.testing.assert_allclose(out, naive_attention(q, k, v, causal, 0.3),
                             rtol=1e-5, atol=1e-5)


def test_segments_and_lse():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
             for _ in range(3))
  segment_ids = np.array([[0, 0, 1, 1, 1, 2]])
  out, lse = reference_attention(q, k, v, causal=True, sm_scale=0.5,
                                 segment_ids=segment_ids, return_lse=True)
  np.testing.assert_allclose(
      out, naive_attention(q, k, v, True, 0.5, segment_ids), rtol=1e-5,
      atol=1e-5)
  # The last token is alone in its segment: lse is its own score.
  np.testing.assert_allclose(lse[0, :, 5],
                             0.5 * np.einsum('hd,hd->h', q[0, 5], k[0, 5]),
                             rtol=1e-5)
  assert lse.shape == (1, 2, 6) and lse.dtype == np.float32


def test_rows_without_keys_are_zero():
  # Causal with seq_q > seq_kv: the first seq_q - seq_kv queries see nothing.
  q = jax.random.normal(jax.random.key(0), (1, 5, 1, 4))
  k = v = jax.random.normal(jax.random.key(1), (1, 3, 1, 4))
  out, lse = reference_attention(q, k, v, causal=True, return_lse=True)
  np.testing.assert_array_equal(out[0, :2], 0)
  assert np.all(np.isneginf(lse[0, 0, :2])) and np.all(np.isfinite(out))


@pytest.mark.parametrize('causal,tq,tk,h,hk,segments', [
    (False, 9, 9, 4, 2, False), (True, 9, 9, 2, 2, True),
    (True, 5, 11, 4, 1, False)])
def test_bwd_from_lse_equals_autodiff(causal, tq, tk, h, hk, segments):
  keys = jax.random.split(jax.random.key(tq * tk + h), 5)
  q = jax.random.normal(keys[0], (2, tq, h, 8))
  k = jax.random.normal(keys[1], (2, tk, hk, 8))
  v = jax.random.normal(keys[2], (2, tk, hk, 8))
  do = jax.random.normal(keys[3], (2, tq, h, 8))
  seg = (jax.random.randint(keys[4], (2, tq), 0, 2).sort(axis=1)
         if segments else None)
  fwd = lambda q, k, v: reference_attention(q, k, v, causal=causal,
                                            segment_ids=seg)
  o, vjp = jax.vjp(fwd, q, k, v)
  _, lse = reference_attention(q, k, v, causal=causal, segment_ids=seg,
                               return_lse=True)
  got = reference_attention_bwd(q, k, v, o, lse, do, causal=causal,
                                segment_ids=seg)
  for g, want in zip(got, vjp(do)):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
