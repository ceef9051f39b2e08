"""The text context of a HunyuanVideo forward pass: `HunyuanVideoContext`.

HunyuanVideo's text encoders are not ported: a LLaVA-Llama-3-8B encoder gives
per-token hidden states (the pipeline's `prompt_embeds`, [B, L, 4096], with
`prompt_attention_mask` [B, L]: L = 256 after the prompt template is cropped, the
real tokens first, then padding) and CLIP ViT-L/14 a pooled projection
(`pooled_prompt_embeds`, [B, 768]). A pipeline computes them elsewhere (for
instance with diffusers' `HunyuanVideoPipeline.encode_prompt`) and hands them in
precomputed. The guidance-distilled model also takes the embedded guidance scale
(`guidance` = guidance_scale * 1000, as diffusers' pipeline forms it), once per
sample; it is part of the context because it is constant over the denoising steps.

The context is a pytree (`flax.struct.dataclass`): the sampler can concatenate two
of them leaf by leaf (classifier-free guidance) and pass it through jit. A field
that is None is static: `text_mask=None` means every text token is real.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from flax import struct


@struct.dataclass
class HunyuanVideoContext:
  """text: [B, L, text_dim] LLM hidden states; pooled: [B, pooled_dim] CLIP pooled
  projection; text_mask: [B, L] (bool or 0/1, real tokens first, then padding) or
  None when every token is real; guidance: float [B] embedded guidance
  (guidance_scale * 1000) for models with guidance_embeds, else None."""

  text: jax.Array
  pooled: jax.Array
  text_mask: Optional[jax.Array] = None
  guidance: Optional[jax.Array] = None

  @classmethod
  def from_pipeline(cls, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask=None,
                    guidance_scale: Optional[float] = 6.0) -> "HunyuanVideoContext":
    """From the encoder outputs as diffusers' `HunyuanVideoPipeline.encode_prompt`
    returns them; guidance_scale (6.0 is the pipeline's default) becomes the embedded
    guidance guidance_scale * 1000 (None: a model without guidance_embeds)."""
    text = np.asarray(prompt_embeds)
    guidance = None
    if guidance_scale is not None:
      guidance = np.full((text.shape[0],), float(guidance_scale) * 1000.0, np.float32)
    mask = None if prompt_attention_mask is None else np.asarray(prompt_attention_mask)
    return cls(text=text, pooled=np.asarray(pooled_prompt_embeds), text_mask=mask,
               guidance=guidance)

  @property
  def batch(self) -> int:
    return self.text.shape[0]

  @property
  def text_len(self) -> int:
    return self.text.shape[1]

  def trim_padding(self) -> "HunyuanVideoContext":
    """Drops the trailing padding on the host (concrete arrays only).

    The text keeps max over the batch of the real-token counts; the mask becomes
    None when every row is then all real (one prompt, or prompts of one length).
    The video prediction does not change: padded tokens are masked out as keys
    everywhere and the output reads the video tokens only, so they never reach it.
    An attention control needs this (it takes no key mask; see
    `models.hunyuan.transformer`), and it shortens the joint sequence. Raises
    ValueError when a mask is not real tokens first, then padding.
    """
    if self.text_mask is None:
      return self
    mask = np.asarray(self.text_mask) != 0
    lengths = mask.sum(axis=1)
    prefix = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not np.array_equal(mask, prefix):
      raise ValueError("text_mask must hold the real tokens first, then padding, in every row "
                       "(right padding, as the tokenizer writes it)")
    if lengths.min() < 1:
      raise ValueError("text_mask has a row without any real token")
    keep = int(lengths.max())
    text = np.asarray(self.text)[:, :keep]
    new_mask = None if int(lengths.min()) == keep else np.asarray(self.text_mask)[:, :keep]
    return self.replace(text=text, text_mask=new_mask)
