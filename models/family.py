"""The small protocol every model family meets, so the sampler never branches on names.

A family is data plus pure functions: a hashable object (it is static inside
jit) that knows its latent channels, its compute dtype, which latent sizes it
accepts, where the video tokens sit in its self-attention sequence, and how to
run one forward pass. The sampler, the attention policies and the pipelines
see a model only through this.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
  """The self-attention problem of one forward pass at given latent sizes.

  The sequence holds `seq_len` tokens; the video tokens are the contiguous run
  [video_start, video_start + video_tokens) in frame-major order, each latent
  frame `tokens_per_frame` tokens. Any other token (text, in families with joint
  attention) lies outside that run. `num_layers` self-attention layers of
  `num_heads` heads of `head_dim` take a control each.
  """
  num_layers: int
  num_heads: int
  head_dim: int
  seq_len: int
  video_start: int
  video_tokens: int
  tokens_per_frame: int

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"AttentionLayout.{f.name} must be an int >= 0, got {value!r}")
    if self.video_start + self.video_tokens > self.seq_len:
      raise ValueError(
          f"AttentionLayout: video tokens [{self.video_start}, "
          f"{self.video_start + self.video_tokens}) exceed seq_len={self.seq_len}")

  @property
  def video_only(self) -> bool:
    """True when every token of the sequence is a video token (Wan)."""
    return self.video_start == 0 and self.video_tokens == self.seq_len


class Family(Protocol):
  """What the sampler needs of a model family."""

  name: str
  latent_channels: int
  dtype: Any  # compute dtype the latents are cast to before a forward pass

  def check_latent_size(self, frames: int, height: int, width: int) -> None:
    """ValueError naming the size and the rule when the model cannot take it."""

  def attention_layout(self, frames: int, height: int, width: int) -> AttentionLayout:
    """Where the video tokens sit at these latent sizes."""

  def apply(self, params, latents, timestep, context, control: Optional[Any] = None):
    """(prediction [B, C, F, H, W], per-layer stats stacked [L, ...])."""


class ConfigFamily:
  """The `Family` members every family derives from its `config` the same way: the
  latent channels (config.in_channels), the compute dtype and the latent-size check
  (config.grid)."""

  @property
  def latent_channels(self) -> int:
    return self.config.in_channels

  @property
  def dtype(self):
    return self.config.dtype

  def check_latent_size(self, frames: int, height: int, width: int) -> None:
    self.config.grid(frames, height, width)
