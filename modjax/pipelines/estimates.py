"""Memory estimates of a pipeline's denoising stage, and the check made before compiling.

`denoise_stage_bytes` reads the attention problem from the family's layout (joint
text + video sequences included), so every pipeline asks `modjax.memory` the same
way; the pipelines add their own text-encoding and VAE stages.
"""

from __future__ import annotations

import math

import jax

from modjax import config as cfg_lib
from modjax import memory, policies, predict
from modjax import sharding as sharding_lib


def _xla_dense(attention) -> bool:
  """Whether the dense passes run XLA's attention (S x S scores in memory)."""
  on_gpu = jax.default_backend() in ("gpu", "tpu")
  if isinstance(attention, cfg_lib.DenseConfig):
    impl = getattr(attention, "implementation", None)
  else:
    impl = getattr(attention, "dense_implementation", None)
  return impl == "xla" or (impl is None and not on_gpu)


def denoise_stage_bytes(family, latent: tuple[int, int, int], *, batch: int, rows: int,
                        dim: int, ffn_dim: int, cross_text_len: int,
                        attention: cfg_lib.AttentionConfig) -> int:
  """Peak working bytes of the denoising scan at latent sizes (frames, height, width).

  batch: videos; rows: the model's batch (2 x batch with classifier-free guidance);
  dim / ffn_dim: the transformer's widths; cross_text_len: tokens of a cross-attended
  text context (0 for joint attention, whose text is in the layout's sequence).
  """
  layout = family.attention_layout(*latent)
  mod_blocks = mod_width = None
  if isinstance(attention, cfg_lib.MODConfig):
    geom = policies.Geometry.from_layout(layout, batch=rows, block_size=attention.block_size)
    mod_blocks = geom.num_blocks
    mod_width = predict.max_row_width(attention.top_k, mod_blocks, geom.blocks_per_frame)
  return memory.denoise_bytes(
      rows=rows, seq_len=layout.seq_len, dim=dim, ffn_dim=ffn_dim, heads=layout.num_heads,
      num_layers=layout.num_layers, text_len=cross_text_len,
      latent_elements=batch * family.latent_channels * math.prod(latent), dtype=family.dtype,
      dense_attention="xla" if _xla_dense(attention) else "flash", mod_blocks=mod_blocks,
      mod_width=mod_width)


def check(estimate: memory.MemoryEstimate, what: str, mesh=None) -> None:
  """Refuse (memory.InsufficientMemoryError) when the one-device estimate exceeds the
  device's memory; skipped on a mesh of more than one device."""
  if sharding_lib.resolve(mesh).size == 1:
    memory.check_fits(estimate, what)
