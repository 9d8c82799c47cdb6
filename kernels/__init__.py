"""Attention kernels: the reference semantics and the Pallas kernels."""
from kernels.reference import reference_attention
