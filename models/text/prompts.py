"""Prompts -> text embeddings, with diffusers WanPipeline's semantics.

`encode_prompts` does what `WanPipeline._get_t5_prompt_embeds` does: clean each
prompt (`prompt_clean`), tokenize to max_length with padding, truncation and
`</s>`, encode with the padding mask, and zero every embedding past the
prompt's token count (the Wan transformer cross-attends to all max_length
positions, so padding must read as zeros, not as the encoder's padding output).
"""

from __future__ import annotations

import html
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from models.text.t5 import T5EncoderConfig, encode
from models.text.tokenizer import Tokenizer

# diffusers cleans with the `regex` module, whose \s is Unicode White_Space;
# Python's re \s would also match U+001C..U+001F.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def _fix_text(text: str) -> str:
  try:
    import ftfy  # optional, as in diffusers
  except ImportError:
    return text
  return ftfy.fix_text(text)


def prompt_clean(text: str) -> str:
  """diffusers' `prompt_clean`: ftfy.fix_text when ftfy is installed, html.unescape
  twice, strip, collapse whitespace runs to one space, strip."""
  text = html.unescape(html.unescape(_fix_text(text))).strip()
  return _WHITESPACE.sub(" ", text).strip()


def prompt_list(prompts) -> list[str]:
  """prompts (a string or a non-empty list of strings) as a list."""
  if isinstance(prompts, str):
    return [prompts]
  if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
    return list(prompts)
  raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")


@jax.jit
def _zero_padding(embeddings, mask):
  """Zeros embeddings [B, L, D] at positions >= each row's mask count."""
  keep = jnp.arange(embeddings.shape[1])[None, :] < mask.sum(axis=1)[:, None]
  return jnp.where(keep[..., None], embeddings, 0.0)


def encode_prompts(encoder_config: T5EncoderConfig, params, tokenizer: Tokenizer,
                   prompts: str | Sequence[str], *, max_length: int = 512) -> jax.Array:
  """prompts (a string or a list of strings) -> embeddings [B, max_length, d_model]
  float32, zero past each prompt's token count (its `</s>` included)."""
  prompts = prompt_list(prompts)
  ids, mask = tokenizer([prompt_clean(p) for p in prompts], max_length=max_length)
  embeddings = encode(encoder_config, params, ids, mask)
  return _zero_padding(embeddings, jnp.asarray(mask))
