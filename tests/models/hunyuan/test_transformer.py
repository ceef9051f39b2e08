"""HunyuanVideoDiT: the family's attention layout and the control contract (one layer
axis over dual then single blocks, video tokens first), text padding, layer modes,
dtypes and input validation. Parity with diffusers is in test_convert.py."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct, traverse_util

from models import hunyuan
from models.hunyuan import HunyuanVideoConfig, HunyuanVideoContext, HunyuanVideoFamily
from tests.models.helpers import random_params
from tests.models.hunyuan.common import forward, inputs

# Two blocks of each kind, so that every scan runs more than one layer.
CFG = HunyuanVideoConfig.tiny(num_layers=2, num_single_layers=2)
LATENT = (3, 4, 6)                      # 3 frames of 2 x 3 tokens: 18 video tokens
VIDEO, PER_FRAME, TEXT_LEN = 18, 6, 7
# Padded text (rows of 7 and 3 real tokens): the input structure most tests share.
STD_INPUTS = inputs(CFG, latent=LATENT, text_len=TEXT_LEN, lengths=[7, 3])


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


# Trace-time record of what each scanned attention call saw (one entry per trace).
SEEN = []


@struct.dataclass
class RecordingControl:
  """A fake control: dense attention (optionally blind to the keys past video_tokens),
  its own layer index returned as a stat, q/k/v shapes recorded at trace time."""
  layer: jax.Array                                   # int32 [num_attention_layers]
  video_tokens: int = struct.field(pytree_node=False, default=0)
  text_blind: bool = struct.field(pytree_node=False, default=False)

  def self_attention(self, q, k, v):
    SEEN.append((q.shape, k.shape, v.shape))
    mask = None
    if self.text_blind:
      mask = (jnp.arange(k.shape[1]) < self.video_tokens)[None, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask), {"layer": self.layer}

  def cross_attention(self, q, k, v):
    raise AssertionError("HunyuanVideo has no cross-attention")


@functools.cache
def _run(family):
  return jax.jit(family.apply)


def _control(layout, text_blind=False):
  return RecordingControl(layer=jnp.arange(layout.num_layers, dtype=jnp.int32),
                          video_tokens=layout.video_tokens, text_blind=text_blind)


def test_family_layout_video_first_then_text():
  family = HunyuanVideoFamily(HunyuanVideoConfig.hunyuan_video(), text_len=256)
  layout = family.attention_layout(33, 90, 160)  # 720p, 129 frames
  assert layout == hunyuan.transformer.AttentionLayout(
      num_layers=60, num_heads=24, head_dim=128, seq_len=33 * 3600 + 256, video_start=0,
      video_tokens=33 * 3600, tokens_per_frame=3600)
  assert not layout.video_only
  assert family.latent_channels == 16 and family.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="width=161"):
    family.check_latent_size(33, 90, 161)
  with pytest.raises(ValueError, match="text_len"):
    HunyuanVideoFamily(HunyuanVideoConfig.tiny(), text_len=0)


def test_control_layer_axis_spans_dual_then_single_blocks_video_first(params):
  family = HunyuanVideoFamily(CFG, text_len=TEXT_LEN)
  layout = family.attention_layout(*LATENT)
  assert (layout.num_layers, layout.seq_len, layout.video_tokens) == (4, VIDEO + TEXT_LEN, VIDEO)
  assert layout.tokens_per_frame == PER_FRAME
  latents, timestep, context = inputs(CFG, latent=LATENT, text_len=TEXT_LEN)
  SEEN.clear()
  out, stats = _run(family)(params, latents, timestep, context, _control(layout))
  # Both scans (dual, single) handed the control the whole joint sequence.
  qkv = (2, layout.seq_len, layout.num_heads, layout.head_dim)
  assert len(SEEN) >= 2 and set(SEEN) == {(qkv, qkv, qkv)}
  # Stats come back on the control's layer axis, dual blocks first, then single.
  np.testing.assert_array_equal(stats["layer"], np.arange(4))
  # A dense control gives the dense forward.
  dense, dense_stats = forward(CFG)(params, latents, timestep, context)
  assert dense_stats == {}
  chex.assert_trees_all_close(out, dense, atol=1e-5, rtol=1e-5)


def test_video_tokens_lie_where_the_layout_says_in_every_layer(params):
  """Same latents, pooled text and guidance in both rows, different LLM states: a
  control that hides the keys past video_tokens makes the video prediction
  text-independent; that holds only if [0, video_tokens) is the video in every layer."""
  family = HunyuanVideoFamily(CFG, text_len=TEXT_LEN)
  layout = family.attention_layout(*LATENT)
  latents, timestep, context = inputs(CFG, latent=LATENT, text_len=TEXT_LEN)
  latents = np.repeat(latents[:1], 2, axis=0)
  timestep = np.repeat(timestep[:1], 2)
  context = context.replace(pooled=np.repeat(context.pooled[:1], 2, axis=0),
                            guidance=np.repeat(context.guidance[:1], 2))
  run = _run(family)
  blind, _ = run(params, latents, timestep, context, _control(layout, text_blind=True))
  seeing, _ = run(params, latents, timestep, context, _control(layout))
  chex.assert_trees_all_close(blind[0], blind[1], atol=1e-6)
  assert float(jnp.abs(seeing[0] - seeing[1]).max()) > 1e-2


def test_padded_text_equals_trimmed_text(params):
  """Padding never reaches the video prediction: trimming it (host side) changes nothing,
  and a context without padding may then run under a control. (That the mask is honoured
  at all is the diffusers parity test's job.)"""
  latents, timestep, padded = inputs(CFG, latent=LATENT, text_len=9, lengths=[7, 4])
  trimmed = padded.trim_padding()
  assert trimmed.text_len == 7 and trimmed.text_mask is not None  # rows of unequal length
  out, _ = forward(CFG)(params, latents, timestep, padded)
  chex.assert_trees_all_close(forward(CFG)(params, latents, timestep, trimmed)[0], out,
                              atol=1e-5, rtol=1e-5)

  one = jax.tree.map(lambda a: a[1:], padded).trim_padding()
  assert one.text_len == 4 and one.text_mask is None
  family = HunyuanVideoFamily(CFG, text_len=4)
  controlled, _ = _run(family)(params, latents[1:], timestep[1:], one,
                               _control(family.attention_layout(*LATENT)))
  chex.assert_trees_all_close(controlled, out[1:], atol=1e-5, rtol=1e-5)


def test_control_with_a_padding_mask_raises(params):
  latents, timestep, context = STD_INPUTS
  layout = HunyuanVideoFamily(CFG, TEXT_LEN).attention_layout(*LATENT)
  with pytest.raises(ValueError, match="trim_padding"):
    hunyuan.apply(CFG, params, latents, timestep, context, _control(layout))


def test_trim_padding_rejects_left_padding_and_empty_rows():
  ctx = HunyuanVideoContext(text=np.zeros((2, 4, 3)), pooled=np.zeros((2, 2)),
                            text_mask=np.array([[0, 1, 1, 1], [1, 1, 0, 0]]))
  with pytest.raises(ValueError, match="real tokens first"):
    ctx.trim_padding()
  with pytest.raises(ValueError, match="without any real token"):
    ctx.replace(text_mask=np.array([[1, 1, 0, 0], [0, 0, 0, 0]])).trim_padding()


def test_from_pipeline_embeds_the_guidance_scale():
  ctx = HunyuanVideoContext.from_pipeline(np.zeros((2, 5, 3)), np.zeros((2, 4)),
                                          np.ones((2, 5)), guidance_scale=6.0)
  np.testing.assert_array_equal(ctx.guidance, [6000.0, 6000.0])
  assert ctx.batch == 2 and ctx.text_len == 5
  assert HunyuanVideoContext.from_pipeline(np.zeros((1, 5, 3)), np.zeros((1, 4)),
                                           guidance_scale=None).guidance is None


@pytest.mark.parametrize("scan_layers,remat", [(False, False), (True, True)],
                         ids=["loop", "scan_remat"])
def test_layer_modes_equal_the_scanned_model(params, scan_layers, remat):
  latents, timestep, context = STD_INPUTS
  scanned, _ = forward(CFG)(params, latents, timestep, context)
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers, remat=remat)
  layout_params = params
  if not scan_layers:
    layout_params = traverse_util.unflatten_dict(hunyuan.to_loop_layout(params, CFG))
  chex.assert_trees_all_equal_shapes(layout_params, hunyuan.param_shapes(cfg))
  out, _ = forward(cfg)(layout_params, latents, timestep, context)
  chex.assert_trees_all_close(out, scanned, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_tracks_float32(params):
  latents, timestep, context = STD_INPUTS
  ref, _ = forward(CFG)(params, latents, timestep, context)
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  out, _ = forward(bf16)(params, latents, timestep, context)
  assert out.dtype == jnp.bfloat16
  chex.assert_tree_all_finite(out)
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  assert err < 0.05, err


def test_rope_tables_match_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed
  rope = HunyuanVideoRotaryPosEmbed(patch_size=2, patch_size_t=1, rope_dim=[16, 56, 56],
                                    theta=256.0)
  cos, sin = rope(torch.zeros(1, 16, 5, 12, 8))
  ours = hunyuan.rope_tables((5, 6, 4), (16, 56, 56), 256.0)
  # diffusers repeats each angle for the two channels of its pair.
  np.testing.assert_allclose(np.repeat(np.asarray(ours[0]), 2, axis=1), cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.repeat(np.asarray(ours[1]), 2, axis=1), sin.numpy(), atol=1e-6)


def test_unpatchify_inverts_diffusers_channel_order():
  x = np.random.default_rng(0).standard_normal((2, 3, 4, 6, 4))
  pt, p = 2, 2
  grid = (2, 3, 2)
  # diffusers' proj_out layout: token features (C, pt, ph, pw).
  tokens = x.reshape(2, 3, 2, pt, 3, p, 2, p).transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 12, -1)
  chex.assert_trees_all_equal(hunyuan.unpatchify(tokens, (pt, p, p), grid), x)


BAD_INPUTS = {
    "latent_channels": (lambda x, t, c: (x[:, :3], t, c), "latents must be"),
    "timestep": (lambda x, t, c: (x, t[:1], c), "timestep must be"),
    "text_dim": (lambda x, t, c: (x, t, c.replace(text=c.text[..., :5])), "context.text"),
    "pooled": (lambda x, t, c: (x, t, c.replace(pooled=c.pooled[:1])), "context.pooled"),
    "mask": (lambda x, t, c: (x, t, c.replace(text_mask=np.ones((2, 3)))), "text_mask"),
    "no_guidance": (lambda x, t, c: (x, t, c.replace(guidance=None)), "guidance_embeds"),
    "latent_size": (lambda x, t, c: (x[..., :5], t, c), "width=5"),
    "context_type": (lambda x, t, c: (x, t, c.text), "HunyuanVideoContext"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_naming_them(params, case):
  change, match = BAD_INPUTS[case]
  args = change(*STD_INPUTS)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda p: hunyuan.apply(CFG, p, *args), params)


def test_guidance_for_a_model_without_guidance_embeds_raises():
  cfg = HunyuanVideoConfig.tiny(guidance_embeds=False)
  latents, timestep, context = inputs(cfg, latent=LATENT)
  context = context.replace(guidance=np.ones((2,), np.float32))
  with pytest.raises(ValueError, match="no guidance_embeds"):
    jax.eval_shape(lambda p: hunyuan.apply(cfg, p, latents, timestep, context),
                   hunyuan.param_shapes(cfg))


def test_family_checks_text_len_and_control_axis(params):
  family = HunyuanVideoFamily(CFG, text_len=8)
  latents, timestep, context = inputs(CFG, latent=LATENT, text_len=TEXT_LEN)
  with pytest.raises(ValueError, match="text_len is 8"):
    family.apply(params, latents, timestep, context)
  bad = RecordingControl(layer=jnp.arange(CFG.num_layers, dtype=jnp.int32))
  with pytest.raises(ValueError, match="num_layers \\+ num_single_layers = 4"):
    jax.eval_shape(lambda p: hunyuan.apply(CFG, p, latents, timestep, context, bad), params)
