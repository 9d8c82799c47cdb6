"""jaxflash: FlashAttention-2 and ring attention in JAX, and a GPT trainer."""
import os

# XLA's latency-hiding scheduler overlaps ring attention's K/V transfers with
# the attention kernels. XLA reads XLA_FLAGS when its backend starts, so this
# runs on import, before any computation. cuBLAS rather than Triton GEMMs:
# GPT-3 2.7B trains 0.9% faster on an H100 (benchmarks/train_throughput.py).
_XLA_FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',
              '--xla_gpu_enable_triton_gemm=false')
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', '')]
    + [f for f in _XLA_FLAGS if f.split('=')[0] not in
       os.environ.get('XLA_FLAGS', '')]).strip()
