"""Block-sparse attention and sparsity-map kernels for MOD-DiT (JAX / Pallas).

Public API:
  block_sparse_attention(q, k, v, block_mask, *, block_size=128, sm_scale=None,
                         implementation=None, interpret=False,
                         precision="bf16") -> out
  block_sparse_attention_with_map(q, k, v, block_mask, *, block_size=128,
                                  threshold=1e-4, ..., precision="bf16") -> (out, S)
  sparsity_map(q, k, *, block_size=128, threshold=1e-4, block_mask=None, ...,
               precision="bf16") -> S
  PRECISIONS: "bf16", "fp8", "int8_fp8", "int8_bf16" (pallas_kernels.quantize).
  block_mass_map(q, k, *, block_size=128, block_mask=None, ...) -> M (softmax mass per block)
  BlockTable, compact_block_mask, block_mask_from_table: the compacted mask.
  block_sparse_attention_reference: dense float32 oracle;
  quantized_attention_reference, quantized_sparsity_map_reference: the same
  for the quantized precisions; quantize_qkv, dequantize, QuantizedQKV.
  IMPLEMENTATIONS: backend names accepted by `implementation=`.
"""

from pallas_kernels.api import (
    IMPLEMENTATIONS,
    PRECISIONS,
    block_mass_map,
    block_sparse_attention,
    block_sparse_attention_with_map,
    default_implementation,
    sparsity_map,
)
from pallas_kernels.attention_reference import block_sparse_attention_reference
from pallas_kernels.quantize import (
    QuantizedQKV,
    dequantize,
    quantize_qkv,
    quantized_attention_reference,
    quantized_sparsity_map_reference,
)
from pallas_kernels.block_table import (
    BlockTable,
    block_mask_from_table,
    compact_block_mask,
    dense_block_table,
)

__all__ = [
    "IMPLEMENTATIONS",
    "PRECISIONS",
    "QuantizedQKV",
    "BlockTable",
    "block_mask_from_table",
    "block_mass_map",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_with_map",
    "compact_block_mask",
    "default_implementation",
    "dequantize",
    "dense_block_table",
    "quantize_qkv",
    "quantized_attention_reference",
    "quantized_sparsity_map_reference",
    "sparsity_map",
]
