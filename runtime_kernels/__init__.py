"""Triton kernels implementing the ``atom`` ops on CUDA (the lowering's "triton" backend).

Each module appends its exports below (append-only).
"""

from .quantize import gather_quant, rms_norm_quant, silu_mul_quant  # noqa: F401
from .kv_attention import attention_quant_kv, kv_cache_store_quant  # noqa: F401
from .w4a4_gemm import Config as W4A4Config, PreparedWeight, prepare_weight, w4a4_gemm  # noqa: F401
from .hadamard import hadamard_heads  # noqa: F401
from .rope import rope  # noqa: F401
from .w4a4_gemm import takes_blockscaled_path  # noqa: F401
from .kv_attention import kv_dequantize, takes_dense_prefill  # noqa: F401
from .quantize import BlockPlan, plan_blocks  # noqa: F401
