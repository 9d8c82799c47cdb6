"""Hopper (Mosaic GPU) FlashAttention kernels against the float32 reference.

On CPU, two checks cover complementary parts of the kernels:
  - Mosaic GPU interpret mode runs them: warpgroups as threads, TMA copies,
    mbarriers, wgmma, with shared memory and outputs starting as NaN. It
    cannot take wgmma's A operand from registers, so there P is staged through
    shared memory (the GPU build takes P from registers);
  - lowering for sm_90 (jit(...).lower(lowering_platforms=('cuda',))) runs the
    GPU build through Mosaic's layout inference and dialect lowering and its
    shared-memory limit check: layouts, wgmma/TMA tile shapes and swizzles.
Left for the GPU tests (marked gpu): ptxas, register reallocation
(set_max_registers is a no-op in the interpreter), approx exp2, wgmma with P
from registers, and real concurrency.
"""
import functools
import importlib
import re

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
import numpy as np
import pytest

from kernels import flash_mosaic
from kernels import flash_mosaic_vjp
from kernels.flash_mosaic import MosaicConfig
from kernels.flash_mosaic_vjp import MosaicBwdConfig
from kernels.reference import reference_attention
from test_flash_attention import (TOL, Case, _check, _has_empty_rows,
                                  _inputs, check_with_grads)

# The module (kernels/__init__.py re-exports its function under its name).
fa = importlib.import_module('kernels.flash_attention')

GPU_ONLY = ('needs an sm_90 GPU: the interpreter cannot run wgmma_ref_p with '
            'a register LHS (P from registers) and treats set_max_registers_p '
            'and approx_math as no-ops')


def _random_cases(n, seed=0):
  """Shapes the kernels support, drawn at random (fixed seed)."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    kv_heads = int(rng.choice([1, 2]))
    block_k = int(rng.choice([64, 128]))
    cases.append((Case(
        batch=int(rng.integers(1, 3)), seq_q=128 * int(rng.integers(1, 3)),
        seq_kv=block_k * int(rng.integers(1, 4)),
        heads=kv_heads * int(rng.choice([1, 2])), kv_heads=kv_heads,
        head_dim=int(rng.choice(flash_mosaic.HEAD_DIMS)),
        causal=bool(rng.integers(2)),
        dtype=rng.choice(flash_mosaic.DTYPES)),
                  MosaicConfig(block_k, int(rng.choice([2, 3])))))
  return cases


# Small key blocks give several pipeline steps (more steps than stages, so
# slots are refilled) on sequences the interpreter runs in seconds.
FWD_CASES = [
    (Case(1, 128, 128, 2, 1, 64, False), MosaicConfig(64, 2)),    # MQA
    (Case(1, 256, 256, 2, 2, 128, True), MosaicConfig(64, 2)),
    (Case(1, 128, 384, 2, 2, 80, True, jnp.float16), MosaicConfig(128, 2)),
    (Case(1, 384, 128, 4, 2, 96, True), MosaicConfig(64, 3)),     # no-key rows
    # FA3 scheduling: ping-pong, intra-warpgroup overlap, both.
    (Case(1, 256, 256, 2, 1, 64, True), MosaicConfig(64, 2, pingpong=True)),
    (Case(1, 384, 128, 2, 2, 96, True), MosaicConfig(64, 2, overlap=True)),
    (Case(1, 128, 256, 2, 2, 80, False, jnp.float16),
     MosaicConfig(64, 3, pingpong=True, overlap=True)),
    # Persistent (3 CTAs in interpret mode): CTAs run 2 to 4 tiles each, so
    # the Q/O buffers and K/V slots are reused across tiles. With no-key
    # rows (seq_q > seq_kv, causal), tiles without a step come after tiles
    # with steps; with two batch rows (b2 q384 k128), also before them.
    (Case(2, 256, 256, 2, 1, 128, True), MosaicConfig(64, 2,
                                                      persistent=True)),
    (Case(1, 384, 128, 2, 2, 64, True), MosaicConfig(64, 2, overlap=True,
                                                     persistent=True)),
    (Case(2, 128, 256, 4, 2, 80, False),
     MosaicConfig(128, 3, pingpong=True, persistent=True)),
    (Case(2, 384, 128, 2, 1, 64, True), MosaicConfig(64, 2, persistent=True)),
    (Case(2, 384, 128, 2, 1, 96, True),
     MosaicConfig(128, 2, pingpong=True, persistent=True)),
    # Staggered consumers: with no-key rows (persistent, so tiles without
    # steps come between others), and without overlap.
    (Case(2, 384, 128, 2, 1, 128, True),
     MosaicConfig(64, 2, overlap=True, persistent=True, stagger=True)),
    (Case(1, 256, 256, 2, 2, 80, False, jnp.float16),
     MosaicConfig(64, 3, stagger=True)),
    # Three consumers (192-row tiles): 256 and 512 rows end in a block where
    # two or one of them have no rows; persistent with no-key rows; staggered
    # in a chain (warpgroup 2 after 1 after 0).
    (Case(1, 256, 256, 2, 1, 64, True), MosaicConfig(64, 2, consumers=3)),
    (Case(1, 512, 256, 2, 2, 64, False),
     MosaicConfig(64, 2, stagger=True, consumers=3)),
    (Case(2, 384, 128, 2, 1, 64, True),
     MosaicConfig(64, 2, overlap=True, persistent=True, stagger=True,
                  consumers=3)),
    (Case(2, 256, 256, 2, 1, 96, False, jnp.float16),
     MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                  consumers=3)),
    # The d80/d96 causal default from 8192 keys (staggered, no overlap):
    # without NPROC (conftest.py) this one starved the interpreter's thread
    # pool on a 2-core machine.
    (Case(1, 384, 384, 2, 1, 80, True),
     MosaicConfig(128, 2, stagger=True, consumers=3)),
    # Split tail on 3 CTAs: 5 tiles of 8 key blocks, the last 2 in shares of
    # 5, 5 and 6 blocks (the second CTA's crosses a tile boundary); 4 tiles
    # of 4 blocks, the last in 3 parts; GQA across the tail; fp16.
    (Case(1, 128, 512, 5, 1, 64, False),
     MosaicConfig(64, 2, pingpong=True, persistent=True, split_tail=True)),
    (Case(1, 256, 512, 2, 2, 128, False),
     MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                  split_tail=True)),
    (Case(2, 128, 384, 4, 2, 96, False, jnp.float16),
     MosaicConfig(64, 2, overlap=True, persistent=True, split_tail=True)),
    # Balanced (list-scheduled) causal tiles on 3 CTAs, counts differing by
    # CTA; with no-key rows (tiles of no step) and staggered overlap.
    (Case(1, 384, 384, 3, 1, 64, True),
     MosaicConfig(64, 2, pingpong=True, persistent=True, balance=True)),
    (Case(2, 384, 128, 2, 1, 128, True),
     MosaicConfig(64, 2, overlap=True, persistent=True, stagger=True,
                  balance=True)),
    # Three consumers: 192-row tiles, the last of each head with one
    # consumer without rows.
    (Case(1, 512, 512, 3, 1, 64, True),
     MosaicConfig(64, 2, overlap=True, persistent=True, stagger=True,
                  consumers=3, balance=True)),
    # Each consumer its own key blocks (three consumers, 192-row tiles):
    # consumers 0 and 1 pass slots on; with seq_q > seq_kv rows of the
    # first tiles see no key while the tile's others do (stagger meetings
    # kept); overlap and not, persistent with tiles of no step.
    (Case(1, 768, 768, 2, 1, 64, True),
     MosaicConfig(128, 2, overlap=True, stagger=True, consumers=3,
                  own_steps=True)),
    (Case(1, 384, 192, 2, 2, 64, True, jnp.float16),
     MosaicConfig(64, 2, stagger=True, consumers=3, own_steps=True)),
    (Case(2, 384, 128, 2, 1, 96, True),
     MosaicConfig(64, 2, overlap=True, persistent=True, stagger=True,
                  consumers=3, balance=True, own_steps=True)),
    # 256-key blocks with the mask: the first tile's one block and the
    # second's last are half past the diagonal.
    (Case(1, 384, 512, 2, 1, 64, True),
     MosaicConfig(256, 2, pingpong=True, persistent=True, balance=True)),
] + _random_cases(1)


def _fwd_config_id(config):
  return (f'k{config.block_k}_s{config.num_stages}'
          f'{"_pingpong" if config.pingpong else ""}'
          f'{"_overlap" if config.overlap else ""}'
          f'{"_persistent" if config.persistent else ""}'
          f'{"_stagger" if config.stagger else ""}'
          f'{f"_c{config.consumers}" if config.consumers != 2 else ""}'
          f'{"_split" if config.split_tail else ""}'
          f'{"_balance" if config.balance else ""}'
          f'{"_own" if config.own_steps else ""}')


def _case_id(case_config):
  case, config = case_config
  return f'{case}_{_fwd_config_id(config)}'


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  """A failed interpreted kernel leaves global state behind; reset it."""
  yield
  gpu_callbacks.reset_gpu_interpret_mode_state()


@pytest.mark.parametrize('case_config', FWD_CASES, ids=_case_id)
def test_fwd_interpret_matches_reference(case_config):
  case, config = case_config
  q, k, v, *_ = _inputs(case, jax.random.PRNGKey(0))
  o, lse = flash_mosaic.flash_fwd(q, k, v, sm_scale=case.head_dim**-0.5,
                                  causal=case.causal, interpret=True,
                                  config=config)
  o_ref, lse_ref = reference_attention(q, k, v, causal=case.causal,
                                       return_lse=True)
  _check('out', o, o_ref, TOL[case.dtype])
  _check('lse', lse, lse_ref, 1e-5)


BWD_CASES = [
    Case(1, 256, 256, 4, 2, 128, True),                  # GQA, 4 q blocks
    Case(1, 128, 384, 2, 2, 80, True, jnp.float16),      # seq_q < seq_kv
    Case(1, 384, 128, 2, 1, 96, True),                   # no-key rows, MQA
    Case(1, 128, 256, 2, 2, 64, False, jnp.float16),
]


FUSED = MosaicBwdConfig(fused=True)
TWO_KERNELS = MosaicBwdConfig(block_k=128)
LATE_DQ = MosaicBwdConfig(fused=True, late_dq_store=True)
BWD_CONFIGS = [(case, None) for case in BWD_CASES] + [
    (BWD_CASES[0], FUSED), (BWD_CASES[3], TWO_KERNELS),
    (Case(1, 384, 128, 2, 1, 64, True), FUSED),          # no-key rows, MQA
    (Case(1, 384, 256, 4, 2, 64, True), FUSED),          # no-key rows, GQA
    (Case(1, 384, 256, 4, 2, 64, True),
     MosaicBwdConfig(num_stages=3, fused=True)),          # the same, 3 stages
    # dQ kernel: 5 key steps through 3 stages.
    (Case(1, 128, 640, 2, 1, 80, True),
     MosaicBwdConfig(block_k=128, num_stages=3)),
    # 128-row dK/dV steps: GQA causal with a masked diagonal; no-key rows,
    # MQA.
    (BWD_CASES[0], MosaicBwdConfig(block_q=128, block_k=128)),
    (Case(1, 384, 256, 2, 1, 96, True),
     MosaicBwdConfig(block_q=128, block_k=128)),
    # Staggered consumers: GQA causal; no-key rows (dQ CTAs without steps).
    (BWD_CASES[0], MosaicBwdConfig(block_k=128, stagger=True)),
    (Case(1, 384, 128, 2, 1, 80, True, jnp.float16),
     MosaicBwdConfig(stagger=True)),
    # Persistent (3 CTAs): GQA causal, 4 dK/dV tiles, staggered; 8 tiles of
    # 2 batch rows, seq_q < seq_kv, fp16; no-key rows, MQA; no mask.
    (BWD_CASES[0],
     MosaicBwdConfig(block_k=128, stagger=True, persistent=True)),
    (Case(2, 256, 512, 2, 1, 80, True, jnp.float16),
     MosaicBwdConfig(block_k=128, persistent=True)),
    (Case(1, 384, 128, 2, 1, 64, True), MosaicBwdConfig(persistent=True)),
    (Case(2, 256, 256, 2, 1, 128, False),
     MosaicBwdConfig(block_k=128, stagger=True, persistent=True)),
    # Fused, each step's dQ stored during the next: GQA causal (the store
    # carried across heads); no-key rows with MQA, fp16; d64 (dQ in turns;
    # 9 and 6 steps in the two CTAs), GQA of 3 heads.
    (BWD_CASES[0], LATE_DQ),
    (Case(1, 384, 256, 2, 1, 128, True, jnp.float16), LATE_DQ),
    (Case(1, 192, 256, 3, 1, 64, True), LATE_DQ),
    # Persistent with balanced tiles (3 CTAs): GQA causal, 8 dK/dV tiles of
    # 2 batch rows and 8 dQ tiles, staggered; no-key rows, MQA.
    (Case(2, 256, 512, 4, 2, 128, True),
     MosaicBwdConfig(block_k=128, stagger=True, persistent=True,
                     balance=True)),
    (Case(1, 384, 128, 2, 1, 64, True),
     MosaicBwdConfig(persistent=True, balance=True)),
]


def _bwd_config_id(config):
  if config is None:
    return ''
  return ((f'_fused_s{config.num_stages}' if config.fused else
           f'_dq_k{config.block_k}_s{config.num_stages}') +
          (f'_q{config.block_q}' if config.block_q != 64 else '') +
          ('_stagger' if config.stagger else '') +
          ('_persistent' if config.persistent else '') +
          ('_balance' if config.balance else '') +
          ('_late_dq' if config.late_dq_store else ''))


@pytest.mark.parametrize('case,config', BWD_CONFIGS,
                         ids=[f'{c}{_bwd_config_id(f)}'
                              for c, f in BWD_CONFIGS])
def test_bwd_interpret_matches_reference_vjp(case, config):
  """The backward alone, fed the reference's o and lse (as ring attention
  feeds global ones); dlse where every row sees a key."""
  q, k, v, do, dlse, _ = _inputs(case, jax.random.PRNGKey(6))
  do = do.astype(case.dtype)
  if _has_empty_rows(case, None, case.seq_q, case.seq_kv):
    dlse = jnp.zeros_like(dlse)  # lse = -inf there: no gradient defined
  ref = lambda q, k, v: reference_attention(q, k, v, causal=case.causal,
                                            return_lse=True)
  (o, lse), vjp = jax.vjp(ref, q, k, v)
  want = vjp((do, dlse))
  got = flash_mosaic_vjp.flash_bwd(q, k, v, o, lse, do, dlse,
                                   sm_scale=case.head_dim**-0.5,
                                   causal=case.causal, interpret=True,
                                   config=config)
  for name, g, g_ref in zip(('dq', 'dk', 'dv'), got, want):
    _check(name, g, g_ref, TOL[case.dtype])


@pytest.mark.parametrize('config', [
    MosaicConfig(64, 2), MosaicConfig(64, 2, pingpong=True, overlap=True),
    MosaicConfig(64, 2, overlap=True, persistent=True),
    MosaicConfig(64, 2, overlap=True, persistent=True, stagger=True,
                 consumers=3),
    MosaicConfig(64, 2, pingpong=True, persistent=True, balance=True),
    MosaicConfig(64, 2, overlap=True, stagger=True, consumers=3,
                 own_steps=True)],
                         ids=['plain', 'pingpong_overlap', 'persistent',
                              'persistent_c3', 'balance', 'own_steps'])
def test_fwd_interpret_no_races(config):
  """The interpreter's happens-before race detector over the mbarrier
  protocol (TMA writes vs. reads of the K/V slots and the Q/O tiles; with
  persistent, 8 tiles on 3 CTAs reuse both Q/O buffers; with three
  consumers, every other tile has two without rows)."""
  case = Case(1, 256, 256, 4, 1, 64, True)
  q, k, v, *_ = _inputs(case, jax.random.PRNGKey(1))
  flash_mosaic.flash_fwd(
      q, k, v, sm_scale=0.125, causal=True, config=config,
      interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert not gpu_callbacks.get_races().races_found


def test_split_tail_interpret_no_races():
  """The race detector over the split tail: 4 tiles on 3 CTAs, the last cut
  in 3 parts, each part's O written twice (high, then low half) through the
  Q/O buffer that the next tile's Q loads into two tiles later."""
  case = Case(1, 256, 512, 2, 1, 64, False)
  q, k, v, *_ = _inputs(case, jax.random.PRNGKey(1))
  flash_mosaic.flash_fwd(
      q, k, v, sm_scale=0.125, causal=False,
      config=MosaicConfig(64, 2, overlap=True, persistent=True,
                          split_tail=True),
      interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert not gpu_callbacks.get_races().races_found


@pytest.mark.parametrize('balance', [False, True])
@pytest.mark.parametrize('head_dim', [64, 128])
def test_persistent_bwd_interpret_no_races(head_dim, balance):
  """The race detector over the persistent backward (tiles round-robin or
  balanced): 8 dK/dV tiles and 8 dQ tiles on 3 CTAs, each consumer loading
  a tile's own K and V (or Q and dO) into the buffer whose output stores
  (two tiles back; at d128 the dQ kernel's one buffer: the last tile) must
  have read it first."""
  case = Case(2, 256, 512, 2, 1, head_dim, True)
  q, k, v, do, _, _ = _inputs(case, jax.random.PRNGKey(8))
  o, lse = reference_attention(q, k, v, causal=True, return_lse=True)
  jax.block_until_ready(flash_mosaic_vjp.flash_bwd(
      q, k, v, o, lse, do.astype(q.dtype), None, sm_scale=0.125, causal=True,
      config=MosaicBwdConfig(block_k=128, stagger=True, persistent=True,
                             balance=balance),
      interpret=plgpu.InterpretGPUParams(detect_races=True)))
  assert not gpu_callbacks.get_races().races_found


@pytest.mark.parametrize('head_dim,config', [
    (64, FUSED), (128, FUSED), (64, MosaicBwdConfig(num_stages=3, fused=True)),
    (64, LATE_DQ), (128, LATE_DQ)],
    ids=['d64', 'd128', 'd64_s3', 'd64_late_dq', 'd128_late_dq'])
def test_fused_bwd_interpret_no_races(head_dim, config, capsys):
  """The race detector over the fused backward's dS exchange: each consumer
  writes its dS^T, both read them (d128: a dQ half each every step; d64:
  in turns; also with 3 stages at d64; and with each step's dQ stored
  during the next), two buffers guarded by ds_ready / ds_free. Only dQ's
  reduce may be reported: the interpreter has no TMA reduce-add, and its
  stand-in (load, add, store; exact as CTAs run one after another) is seen
  racing with the same tile's add from another CTA."""
  case = Case(1, 256, 256, 2, 1, head_dim, True)
  q, k, v, do, _, _ = _inputs(case, jax.random.PRNGKey(7))
  o, lse = reference_attention(q, k, v, causal=True, return_lse=True)
  jax.block_until_ready(flash_mosaic_vjp.flash_bwd(
      q, k, v, o, lse, do.astype(q.dtype), None, sm_scale=0.125, causal=True,
      config=config, interpret=plgpu.InterpretGPUParams(detect_races=True)))
  accesses = [line for line in capsys.readouterr().out.splitlines()
              if line.strip().startswith(('read of', 'write of'))]
  assert all(line.endswith('(_add_to_gmem)') for line in accesses), accesses


def test_api_interpret_with_grads():
  """flash_attention(backend='mosaic') end to end, lse cotangent included."""
  case = Case(1, 128, 128, 2, 1, 64, True)
  q, k, v, do, dlse, _ = _inputs(case, jax.random.PRNGKey(2))
  ours = functools.partial(fa.flash_attention, backend='mosaic',
                           interpret=True)
  check_with_grads(ours, q, k, v, do, dlse, with_lse=True,
                   tol=TOL[case.dtype], lse_tol=1e-5, causal=True)


@pytest.mark.parametrize('sm_scale', [0.3, 0.02])
def test_api_interpret_other_sm_scale(sm_scale):
  """sm_scale is a kernel input, not a constant: a non-default one reaches the
  scores and the dQ/dK scaling (fused backward at d64)."""
  case = Case(1, 128, 128, 2, 1, 64, True)
  q, k, v, do, dlse, _ = _inputs(case, jax.random.PRNGKey(3))
  ours = functools.partial(fa.flash_attention, backend='mosaic',
                           interpret=True)
  check_with_grads(ours, q, k, v, do, dlse, with_lse=True,
                   tol=TOL[case.dtype], lse_tol=1e-5, causal=True,
                   sm_scale=sm_scale)


def test_layers_share_one_compiled_kernel():
  """GPT-2 scales each layer's scores by 1/(layer + 1): layers differing only
  in sm_scale must lower to the same three kernels (forward, dK/dV, dQ), or
  every layer compiles its own on the GPU."""
  q = jax.ShapeDtypeStruct((1, 256, 2, 80), jnp.bfloat16)

  def layers(q, k, v):
    return sum(fa.flash_attention(q, k, v, causal=True, backend='mosaic',
                                  sm_scale=0.1 / (layer + 1)).sum()
               for layer in range(4))

  text = _lowered_for_sm90(jax.grad(layers, argnums=(0, 1, 2)), q, q, q)
  hashes = re.findall(r'kernel_hash = "(.*?)"', text)
  assert len(hashes) == 3 and len(set(hashes)) == 3, hashes


def test_interpreter_needs_p_in_smem():
  """Why interpret mode stages P through shared memory: the interpreter's
  wgmma (gpu_callbacks.wgmma) reads operand A as a shared-memory buffer, so
  the GPU build's register P fails there. If this starts passing, drop the
  staging."""
  m = 64

  def body(a_ref, o_ref, a_smem, o_smem, bar):
    plgpu.copy_gmem_to_smem(a_ref, a_smem, bar)
    plgpu.barrier_wait(bar)
    a = a_smem[...]
    o_smem[...] = flash_mosaic.mma(a, a_smem, (m, m))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref)
    plgpu.wait_smem_to_gmem(0)

  run = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, m), jnp.float32),
      scratch_types=[flash_mosaic.smem((m, m), jnp.bfloat16),
                     plgpu.SMEM((m, m), jnp.float32), plgpu.Barrier()],
      interpret=plgpu.InterpretGPUParams())
  with pytest.raises(Exception, match=r'Expected shape \(6,\)'):
    jax.block_until_ready(run(jnp.ones((m, m), jnp.bfloat16)))


def _lowered_for_sm90(fn, *args):
  return jax.jit(fn).trace(*args).lower(
      lowering_platforms=('cuda',)).as_text()


@pytest.mark.parametrize('head_dim', flash_mosaic.HEAD_DIMS)
@pytest.mark.parametrize('causal', [False, True])
def test_lowers_for_sm90(head_dim, causal):
  """Forward and backward kernels, GPU build (P and dS from registers)."""
  q = jax.ShapeDtypeStruct((2, 1024, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1024, 2, head_dim), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((2, 4, 1024), jnp.float32)
  kwargs = dict(sm_scale=0.1, causal=causal, interpret=False)

  def fwd_bwd(q, k, v, do, dlse):
    o, lse = flash_mosaic.flash_fwd(q, k, v, **kwargs)
    return flash_mosaic_vjp.flash_bwd(q, k, v, o, lse, do, dlse, **kwargs)

  text = _lowered_for_sm90(fwd_bwd, q, k, k, q, lse)
  assert text.count('mosaic_gpu') >= 3


@pytest.mark.parametrize('head_dim', flash_mosaic.HEAD_DIMS)
@pytest.mark.parametrize('causal', [False, True])
def test_variants_lower_for_sm90(head_dim, causal):
  """The sweep's variants, GPU build: ping-pong + overlap, persistent +
  overlap and 3-stage overlap forwards (at d128 the last fills the shared
  memory: it fits only without Pallas's reduction scratch), three
  consumers up to d96, the fused backward where it runs (also with the
  late dQ store), a 3-stage dQ kernel below d128 and the persistent dK/dV
  kernel (two K/V buffers), plus 128-row dK/dV steps (a setting out of the
  sweep); the interpreter lacks the accumulator store (overlap), TMA
  reduce-add (fused) and shared-memory limit that only this build has."""
  q = jax.ShapeDtypeStruct((1, 1024, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 1024, 2, head_dim), jnp.bfloat16)
  kwargs = dict(sm_scale=0.1, causal=causal, interpret=False)
  fused = head_dim in flash_mosaic_vjp.FUSED_HEAD_DIMS

  def fwd_bwd(q, k, v, do):
    o, lse = flash_mosaic.flash_fwd(
        q, k, v, config=MosaicConfig(128, 2, pingpong=True, overlap=True),
        **kwargs)
    o2, _ = flash_mosaic.flash_fwd(
        q, k, v, config=MosaicConfig(128, 2, overlap=True, persistent=True),
        **kwargs)
    o3, _ = flash_mosaic.flash_fwd(
        q, k, v, config=MosaicConfig(128, 3, overlap=True), **kwargs)
    o4, _ = flash_mosaic.flash_fwd(
        q, k, v, config=MosaicConfig(128, 2, overlap=True, persistent=True,
                                     stagger=True), **kwargs)
    # The split tail (without the mask): 288 tiles on 132 CTAs.
    x = jnp.zeros((2, 2048, 9, head_dim), jnp.bfloat16)
    o6 = [flash_mosaic.flash_fwd(x, x, x, config=config, **kwargs)[0]
          for config in [MosaicConfig(128, 2, overlap=True, persistent=True,
                                      stagger=True, split_tail=True),
                         MosaicConfig(128, 2, pingpong=True, persistent=True,
                                      split_tail=True)]
          if not causal]
    # Balanced causal tiles (a table of each CTA's tiles).
    o7 = [flash_mosaic.flash_fwd(x, x, x, config=config, **kwargs)[0]
          for config in [MosaicConfig(128, 2, overlap=True, persistent=True,
                                      stagger=True, balance=True),
                         MosaicConfig(128, 2, pingpong=True, persistent=True,
                                      balance=True)]
          if causal]
    # Three consumers (up to d96): 1024 rows end in a 192-row tile with one.
    o5 = [flash_mosaic.flash_fwd(q, k, v, config=config, **kwargs)[0]
          for config in [MosaicConfig(128, 3, stagger=True, consumers=3),
                         MosaicConfig(128, 2, overlap=True, stagger=True,
                                      consumers=3),
                         MosaicConfig(128, 2, overlap=True, persistent=True,
                                      stagger=True, consumers=3)] +
          ([MosaicConfig(128, 2, overlap=True, persistent=True,
                         stagger=True, consumers=3, balance=True)]
           if causal else [])
          if head_dim <= 96]
    bwd = [flash_mosaic_vjp.flash_bwd(q, k, v, o, lse, do, None,
                                      config=config, **kwargs)
           for config in ([FUSED, LATE_DQ] if fused else [TWO_KERNELS]) +
           # dQ's K and V in 3 stages fit below d128.
           ([MosaicBwdConfig(block_k=128, num_stages=3)]
            if head_dim <= 96 else []) +
           [MosaicBwdConfig(block_q=128, block_k=128),
            MosaicBwdConfig(block_k=128, stagger=True),
            MosaicBwdConfig(block_k=128, stagger=True, persistent=True),
            MosaicBwdConfig(block_k=128, stagger=True, persistent=True,
                            balance=True)]]
    return bwd, o2, o3, o4, o5, o6, o7

  assert 'mosaic_gpu' in _lowered_for_sm90(fwd_bwd, q, k, k, q)


def test_cross_warp_reduction_fails_to_lower():
  """fm.COMPILER_PARAMS reserves no reduction scratch, so a reduction across
  warps (here over a WGMMA tile's rows) must fail to lower rather than run
  on an empty buffer; every kernel lowering here (test_lowers_for_sm90 and
  above) then shows that their reductions stay within a warp."""
  def column_sums(o_ref, sums_smem):
    x = plgpu.layout_cast(jnp.ones((64, 64), jnp.float32),
                          plgpu.Layout.WGMMA)
    sums_smem[...] = jnp.sum(x, axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sums_smem, o_ref)
    plgpu.wait_smem_to_gmem(0)

  cross_warp = plgpu.kernel(
      column_sums, out_type=jax.ShapeDtypeStruct((64,), jnp.float32),
      scratch_types=[plgpu.SMEM((64,), jnp.float32)],
      compiler_params=flash_mosaic.COMPILER_PARAMS)
  with pytest.raises(Exception, match='reduction scratch size'):
    _lowered_for_sm90(cross_warp)


def test_stagger_refuses_pingpong_and_fused():
  with pytest.raises(ValueError, match='stagger is for schedules without'):
    MosaicConfig(pingpong=True, stagger=True)
  with pytest.raises(ValueError, match='stagger is for the two-kernel'):
    MosaicBwdConfig(fused=True, stagger=True)
  with pytest.raises(ValueError, match='persistent is for the two-kernel'):
    MosaicBwdConfig(fused=True, persistent=True)
  with pytest.raises(ValueError, match='late_dq_store is for the fused'):
    MosaicBwdConfig(late_dq_store=True)
  with pytest.raises(ValueError, match='balance is for the persistent'):
    MosaicBwdConfig(balance=True)


def test_consumers_two_or_three_and_pingpong_two():
  with pytest.raises(ValueError, match=r'consumers must be one of \(2, 3\)'):
    MosaicConfig(consumers=4)
  with pytest.raises(ValueError, match='pingpong takes two consumers'):
    MosaicConfig(pingpong=True, consumers=3)


def test_split_tail_and_balance_configs():
  with pytest.raises(ValueError, match='split_tail needs persistent'):
    MosaicConfig(split_tail=True)
  with pytest.raises(ValueError, match='split_tail needs persistent'):
    MosaicConfig(persistent=True, stagger=True, consumers=3, split_tail=True)
  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match='balance is for the persistent'):
    MosaicConfig(balance=True)
  with pytest.raises(ValueError, match='not both'):
    MosaicConfig(persistent=True, balance=True, split_tail=True)
  with pytest.raises(ValueError, match='split_tail is for attention without'):
    _lowered_for_sm90(lambda q: flash_mosaic.flash_fwd(
        q, q, q, sm_scale=0.1, causal=True, interpret=False,
        config=MosaicConfig(persistent=True, split_tail=True)), q)


@pytest.mark.parametrize('causal', [False, True])
def test_defaults_only_where_their_kernels_run(causal):
  """The default configs (built, so validated): the split tail only without
  the mask, the fused backward only at its head dims."""
  for head_dim in flash_mosaic.HEAD_DIMS:
    bwd = MosaicBwdConfig.default(head_dim, causal)
    assert not bwd.fused or head_dim in flash_mosaic_vjp.FUSED_HEAD_DIMS
    for seq_kv in (128, 256, 384, 512, 1024, 2048, 4096, 4224, 8192, 16384,
                   32768):
      fwd = MosaicConfig.default(head_dim, causal, seq_kv)
      assert not (fwd.split_tail and causal), (head_dim, seq_kv)
      assert seq_kv % fwd.block_k == 0 or fwd.block_k == 128, (head_dim,
                                                                 seq_kv)


def test_fused_needs_head_dim_64_or_128():
  q = jax.ShapeDtypeStruct((1, 256, 2, 80), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, 2, 256), jnp.float32)
  with pytest.raises(ValueError, match=r'fused backward needs head_dim'):
    _lowered_for_sm90(lambda q, lse: flash_mosaic_vjp.flash_bwd(
        q, q, q, q, lse, q, None, sm_scale=0.1, causal=False,
        interpret=False, config=FUSED), q, lse)
  with pytest.raises(ValueError, match=r'fused needs block_q == 64'):
    MosaicBwdConfig(block_q=128, fused=True)


def test_lowers_for_sm90_float16_other_blocks():
  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float16)
  lse = jax.ShapeDtypeStruct((1, 2, 256), jnp.float32)
  kwargs = dict(sm_scale=0.1, causal=True, interpret=False)
  text = _lowered_for_sm90(
      lambda q, k, v: flash_mosaic.flash_fwd(
          q, k, v, config=MosaicConfig(64, 3), **kwargs), q, q, q)
  assert 'mosaic_gpu' in text
  text = _lowered_for_sm90(
      lambda q, lse: flash_mosaic_vjp.flash_bwd(
          q, q, q, q, lse, q, None,
          config=flash_mosaic_vjp.MosaicBwdConfig(128, 128, 3), **kwargs),
      q, lse)
  assert 'mosaic_gpu' in text


# --- Dispatch and validation -----------------------------------------------

UNSUPPORTED = [
    ('float32', dict(dtype=jnp.float32), {}, r'bfloat16 or float16.*float32'),
    ('head_dim 32', dict(head_dim=32), {}, r'head_dim in .*got 32'),
    ('seq_q', dict(seq_q=200), {}, r'seq_q a multiple of 128, got 200'),
    ('seq_kv', dict(seq_kv=192), {}, r'seq_kv a multiple of 128, got 192'),
    ('segments', {}, dict(segment_ids=jnp.zeros((1, 256), jnp.int32)),
     r'segment_ids'),
    ('block_sizes', {}, dict(block_sizes=fa.BlockSizes()), r'block_sizes'),
]


def _arrays(seq_q=256, seq_kv=256, head_dim=64, dtype=jnp.bfloat16):
  q = jnp.ones((1, seq_q, 2, head_dim), dtype)
  k = jnp.ones((1, seq_kv, 2, head_dim), dtype)
  return q, k, k


@pytest.mark.parametrize('shape,kwargs,match', [u[1:] for u in UNSUPPORTED],
                         ids=[u[0] for u in UNSUPPORTED])
def test_mosaic_unsupported_raises(shape, kwargs, match):
  q, k, v = _arrays(**shape)
  for fn in (fa.flash_attention, fa.flash_attention_fwd):
    with pytest.raises(ValueError, match=match):
      fn(q, k, v, backend='mosaic', interpret=True, **kwargs)


@pytest.mark.parametrize('shape,kwargs', [u[1:3] for u in UNSUPPORTED],
                         ids=[u[0] for u in UNSUPPORTED])
def test_auto_falls_back_to_triton(shape, kwargs, monkeypatch):
  monkeypatch.setattr(fa, '_on_hopper', lambda: True)
  q, k, _ = _arrays(**shape)
  seg = kwargs.get('segment_ids') is not None
  block_sizes = kwargs.get('block_sizes')
  assert fa._choose_backend('auto', q, k, seg, block_sizes) == 'triton'


def test_auto_picks_mosaic_only_on_hopper(monkeypatch):
  q, k, _ = _arrays()
  monkeypatch.setattr(fa, '_on_hopper', lambda: False)
  assert fa._choose_backend('auto', q, k, False, None) == 'triton'
  monkeypatch.setattr(fa, '_on_hopper', lambda: True)
  assert fa._choose_backend('auto', q, k, False, None) == 'mosaic'


def test_bad_backend_name():
  q, k, v = _arrays()
  with pytest.raises(ValueError, match=r"backend: expected one of"):
    fa.flash_attention(q, k, v, backend='cudnn')


def test_auto_on_cpu_runs_triton_interpret():
  case = Case(1, 128, 128, 2, 2, 64, True)
  q, k, v, *_ = _inputs(case, jax.random.PRNGKey(3))
  o = fa.flash_attention(q, k, v, causal=True, backend='auto', interpret=True)
  _check('out', o, reference_attention(q, k, v, causal=True),
         TOL[case.dtype])


# --- GPU ---------------------------------------------------------------------


def _gpu_cases(n, seed=4):
  """Randomized supported shapes at GPU sizes."""
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(n):
    kv_heads = int(rng.choice([1, 2, 4]))
    seq_q = 128 * int(rng.integers(1, 17))
    cases.append(Case(
        batch=int(rng.integers(1, 3)), seq_q=seq_q,
        seq_kv=(seq_q if rng.integers(2) else
                128 * int(rng.integers(1, 17))),
        heads=kv_heads * int(rng.choice([1, 2, 4])), kv_heads=kv_heads,
        head_dim=int(rng.choice(flash_mosaic.HEAD_DIMS)),
        causal=bool(rng.integers(2)),
        dtype=rng.choice(flash_mosaic.DTYPES)))
  return cases


GPU_CASES = [
    Case(2, 1024, 1024, 4, 2, 128, True),
    Case(2, 1024, 1024, 4, 4, 64, False, jnp.float16),
    Case(1, 2048, 2048, 4, 1, 80, True),
    Case(1, 512, 1536, 2, 2, 96, True),
    Case(1, 1024, 256, 2, 2, 128, True),   # rows that see no key
    # More tiles than SMs: where the default forward is persistent (here
    # all but the d128 case; d80 and d96 up to 8192 keys since 2026-12-02),
    # each CTA runs several tiles (with no-key rows: some without steps);
    # GPU_VARIANTS runs the d128 one persistent too.
    Case(8, 1024, 1024, 8, 2, 64, True),
    Case(4, 1024, 1024, 8, 8, 80, False),
    Case(4, 512, 1024, 16, 4, 128, True),
    Case(4, 1024, 256, 8, 2, 96, True),
    # d64 runs persistent at every length (causal: up to 4096 keys): long
    # ones with many tiles.
    Case(2, 2048, 2048, 8, 2, 64, True),
    Case(1, 4096, 4096, 8, 8, 64, False, jnp.float16),
    # d80 and d96 above 8192 keys: overlap, not persistent, or three
    # consumers (d96 causal here since 2026-12-04); GPU_VARIANTS runs
    # overlap at d80.
    Case(1, 16384, 16384, 4, 2, 96, True),
    # d128 without the mask from 1024 to 2048 keys: persistent (staggered
    # overlap since 2026-12-03), many tiles a CTA.
    Case(4, 2048, 2048, 16, 4, 128, False),
    # d64 from 8192 keys: three consumers (2026-12-03), causal; persistent
    # without the mask above 8192, here with a last tile of one consumer.
    Case(1, 8192, 8192, 4, 2, 64, True),
    Case(1, 1024, 16384, 4, 1, 64, False, jnp.float16),
    # d80 from 8192 keys, and d96 with the mask: three consumers
    # (2026-12-04; overlap at d80 without the mask), a last tile of two.
    Case(1, 8192, 8192, 4, 2, 80, False),
    Case(1, 8192, 8192, 4, 1, 80, True, jnp.float16),
    Case(1, 8192, 8192, 4, 2, 96, True),
] + _gpu_cases(6)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason=GPU_ONLY)
@pytest.mark.parametrize('case', GPU_CASES, ids=str)
def test_gpu_matches_reference(case):
  q, k, v, do, dlse, _ = _inputs(case, jax.random.PRNGKey(5))
  with_lse = not _has_empty_rows(case, None, case.seq_q, case.seq_kv)
  ours = functools.partial(fa.flash_attention, backend='mosaic')
  check_with_grads(ours, q, k, v, do, dlse, with_lse=with_lse,
                   tol=TOL[case.dtype], lse_tol=1e-4, causal=case.causal)


# The split tail where the tiles do not divide among the SMs: d128 of 288
# tiles (24 left over, about 3 key blocks a CTA); d64 of 320 with 256-key
# blocks; d80 of 256 tiles of 8 key blocks (124 left over, a CTA's share
# of 7 or 8 blocks crossing a tile boundary).
GPU_SPLIT_CASES = [
    (Case(2, 2048, 2048, 9, 3, 128, False),
     MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                  split_tail=True)),
    (Case(2, 4096, 4096, 5, 5, 64, False, jnp.float16),
     MosaicConfig(256, 2, pingpong=True, persistent=True, split_tail=True)),
    (GPU_CASES[6],
     MosaicConfig(128, 2, pingpong=True, persistent=True, split_tail=True)),
]
# Causal tile schedules: balanced tiles at d64 with 3 stages (the
# default's), d128 staggered, no-key rows at d96, d64 with three consumers
# and with 256-key blocks; each consumer its own key blocks (own_steps),
# one CTA a tile and balanced with no-key rows.
GPU_BALANCE_CASES = [
    (Case(4, 2048, 2048, 8, 2, 64, True),
     MosaicConfig(128, 3, pingpong=True, persistent=True, balance=True)),
    (Case(8, 1024, 1024, 8, 4, 128, True, jnp.float16),
     MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                  balance=True)),
    (GPU_CASES[8],
     MosaicConfig(128, 2, pingpong=True, persistent=True, balance=True)),
    (Case(2, 4096, 4096, 8, 2, 64, True),
     MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                  consumers=3, balance=True)),
    (Case(2, 2048, 2048, 8, 2, 64, True),
     MosaicConfig(256, 2, pingpong=True, persistent=True, balance=True)),
    (Case(2, 2048, 2048, 8, 2, 64, True),
     MosaicConfig(128, 2, overlap=True, stagger=True, consumers=3,
                  own_steps=True)),
    (Case(1, 1920, 1024, 4, 2, 96, True, jnp.float16),  # no-key rows
     MosaicConfig(128, 2, overlap=True, persistent=True, stagger=True,
                  consumers=3, balance=True, own_steps=True)),
]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason=GPU_ONLY)
def test_gpu_auto_picks_mosaic_on_hopper():
  q, k, _ = _arrays(seq_q=1024, seq_kv=1024, head_dim=128)
  want = 'mosaic' if fa._on_hopper() else 'triton'
  assert fa._choose_backend('auto', q, k, False, None) == want


# Variants of the benchmark sweep (benchmarks/attention.py --sweep_mosaic),
# plus 128-row dK/dV steps (out of the sweep), through the public API,
# gradients included.
GPU_VARIANTS = [
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, pingpong=True)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, overlap=True)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, overlap=True, persistent=True)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 3, overlap=True)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, overlap=True, stagger=True)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, overlap=True, persistent=True,
                                     stagger=True)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, stagger=True, consumers=3)),
    fa.MosaicTuning(fwd=MosaicConfig(128, 2, overlap=True, persistent=True,
                                     stagger=True, consumers=3)),
    fa.MosaicTuning(fwd=MosaicConfig(64, 4, pingpong=True, overlap=True),
                    bwd=FUSED),
    fa.MosaicTuning(bwd=TWO_KERNELS),
    fa.MosaicTuning(bwd=MosaicBwdConfig(block_k=128, num_stages=3)),
    fa.MosaicTuning(bwd=MosaicBwdConfig(num_stages=3, fused=True)),
    fa.MosaicTuning(bwd=MosaicBwdConfig(block_q=128, block_k=128)),
    fa.MosaicTuning(bwd=MosaicBwdConfig(block_k=128, stagger=True)),
    fa.MosaicTuning(bwd=MosaicBwdConfig(block_k=128, stagger=True,
                                        persistent=True)),
    fa.MosaicTuning(bwd=LATE_DQ),
    fa.MosaicTuning(bwd=MosaicBwdConfig(block_k=128, stagger=True,
                                        persistent=True, balance=True)),
]
GPU_VARIANT_CASES = [GPU_CASES[0], GPU_CASES[1], GPU_CASES[4],
                     Case(1, 1024, 1024, 8, 2, 128, False),
                     GPU_CASES[6], GPU_CASES[7],  # more tiles than SMs
                     # d64 causal, 1024 rows: the last 192-row tile of three
                     # consumers has one with rows.
                     Case(2, 1024, 1024, 4, 2, 64, True)]


def _variant_runs(case, tuning):
  """The fused backward runs at its head dims only, with 3 stages at d64
  only; the dQ kernel's 3 stages fit below d128; three consumers run up to
  d96 (their 160 registers spill more above)."""
  bwd = tuning.bwd
  if tuning.fwd is not None and tuning.fwd.consumers == 3:
    return case.head_dim <= 96
  if bwd is None:
    return True
  if bwd.fused:
    return (case.head_dim in flash_mosaic_vjp.FUSED_HEAD_DIMS and
            (bwd.num_stages <= 2 or case.head_dim <= 64))
  return bwd.num_stages <= 2 or case.head_dim <= 96


GPU_VARIANT_PAIRS = [
    (case, variant) for case in GPU_VARIANT_CASES for variant in GPU_VARIANTS
    if _variant_runs(case, variant)] + [
        # The split tail and balanced tiles on their own cases (the
        # backward takes the forward's lse).
        (case, fa.MosaicTuning(fwd=config))
        for case, config in GPU_SPLIT_CASES + GPU_BALANCE_CASES]


def _variant_id(tuning):
  parts = []
  if tuning.fwd is not None:
    parts.append('fwd_' + _fwd_config_id(tuning.fwd))
  if tuning.bwd is not None:
    parts.append('bwd' + _bwd_config_id(tuning.bwd))
  return '-'.join(parts)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason=GPU_ONLY)
@pytest.mark.parametrize('case,variant', GPU_VARIANT_PAIRS,
                         ids=[f'{c}-{_variant_id(v)}'
                              for c, v in GPU_VARIANT_PAIRS])
def test_gpu_variants_match_reference(case, variant):
  q, k, v, do, dlse, _ = _inputs(case, jax.random.PRNGKey(7))
  with_lse = not _has_empty_rows(case, None, case.seq_q, case.seq_kv)
  ours = functools.partial(fa.flash_attention, backend='mosaic',
                           mosaic_config=variant)
  check_with_grads(ours, q, k, v, do, dlse, with_lse=with_lse,
                   tol=TOL[case.dtype], lse_tol=1e-4, causal=case.causal)
