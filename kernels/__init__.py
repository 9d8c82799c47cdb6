"""Attention kernels: the reference semantics and the Pallas kernels."""
from kernels.reference import reference_attention
from kernels.reference import reference_attention_bwd
from kernels.flash_attention import BlockSizes, flash_attention, flash_attention_bwd, flash_attention_fwd
