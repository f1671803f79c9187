"""The graph passes of atom-compile, one class per file, in pipeline order."""

from .base import AtomPass, PassContext, PassResult
from .fuse_dequant_into_gemm import FuseDequantIntoGemm
from .fuse_quant_into_norm import FuseQuantIntoNorm
from .fuse_sibling_gemms import FuseSiblingGemms
from .insert_quant_nodes import InsertQuantNodes
from .merge_sliced_head_ops import MergeSlicedHeadOps
from .outlier_analysis import OutlierAnalysis
from .quantize_kv_cache import QuantizeKVCache
from .reorder_channels import ReorderChannels
from .rotate_kv_heads import RotateKVHeads

__all__ = [
    "AtomPass", "PassContext", "PassResult", "RotateKVHeads", "OutlierAnalysis", "ReorderChannels", "InsertQuantNodes",
    "FuseQuantIntoNorm", "FuseDequantIntoGemm", "FuseSiblingGemms", "MergeSlicedHeadOps",
    "QuantizeKVCache",
]
