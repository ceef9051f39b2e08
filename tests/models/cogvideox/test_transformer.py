"""CogVideoXDiT: parity with a seeded diffusers CogVideoXTransformer3DModel (through our
converter), the positions against diffusers' own functions, the joint-attention layout
the control sees, layer modes, dtypes and input validation."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from models import attention, cogvideox
from models.cogvideox import CogVideoXConfig, CogVideoXFamily, positions
from tests.models.cogvideox.helpers import diffusers_forward, seeded_diffusers_model
from tests.models.helpers import assert_bfloat16_close, assert_compiles_once, random_params

CFG = CogVideoXConfig.tiny()
B, F, H, W, TEXT_LEN = 2, 3, 6, 10, 5


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((B, CFG.in_channels, F, H, W)).astype(np.float32)
  timestep = np.array([3.0, 871.0], np.float32)
  context = rng.standard_normal((B, TEXT_LEN, CFG.text_dim)).astype(np.float32)
  return latents, timestep, context


@functools.cache
def _forward(config):
  """One compiled forward per config, shared by the tests."""
  return jax.jit(lambda p, x, t, c, control=None, ofs=None:
                 cogvideox.apply(config, p, x, t, c, control, ofs))


# ------------------------------------------------------------------ parity

PARITY_CASES = {
    # 5b: RoPE crop-interpolated (latent 6x10 in a sample grid of 8x12: fractional
    # positions), a text length unlike max_text_seq_length, scanned layers.
    "5b_rope_crop_text=7_scan": dict(diffusers=dict(use_rotary_positional_embeddings=True),
                                     latent=(2, 4, 3, 6, 10), text_len=7, scan_layers=True),
    # 2b: sin-cos embedding, exact GELU, no biases, sin-first timestep features shifted.
    "2b_sincos_gelu_nobias_loop": dict(
        diffusers=dict(use_rotary_positional_embeddings=False, activation_fn="gelu",
                       attention_bias=False, patch_bias=False, flip_sin_to_cos=False,
                       freq_shift=1),
        latent=(2, 4, 2, 8, 6), text_len=5, scan_layers=False),
    # 1.5: 2x2x2 Linear patches (with bias although patch_bias=False), slice RoPE.
    "1.5_rope_slice_pt=2_scan": dict(
        diffusers=dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
        latent=(2, 4, 4, 6, 10), text_len=5, scan_layers=True),
    # 5b-I2V: learned position table over [text; video] at the sample size, no norm affines.
    "5b-i2v_learned_no_affine_scan": dict(
        diffusers=dict(use_rotary_positional_embeddings=True,
                       use_learned_positional_embeddings=True, in_channels=6,
                       norm_elementwise_affine=False),
        latent=(2, 6, 3, 8, 12), text_len=5, scan_layers=True),
    # 1.5-I2V: the ofs embedding added to the time embedding.
    "1.5-i2v_ofs_scan": dict(
        diffusers=dict(use_rotary_positional_embeddings=True, patch_size_t=2, in_channels=6,
                       ofs_embed_dim=24),
        latent=(2, 6, 2, 4, 6), text_len=5, scan_layers=True, ofs=True),
}


@pytest.mark.parametrize("case", list(PARITY_CASES), ids=list(PARITY_CASES))
def test_parity_with_diffusers(case, tmp_path, record_property):
  pytest.importorskip("diffusers")
  spec = PARITY_CASES[case]
  reference = seeded_diffusers_model(**spec["diffusers"])
  reference.save_pretrained(tmp_path / "ref")
  config, params = cogvideox.load_diffusers_transformer(tmp_path / "ref",
                                                        scan_layers=spec["scan_layers"])
  assert config.num_layers == 2 and config.scan_layers == spec["scan_layers"]

  rng = np.random.default_rng(1)
  latents = rng.standard_normal(spec["latent"]).astype(np.float32)
  timestep = np.array([3.5, 871.0], np.float32)
  context = rng.standard_normal((2, spec["text_len"], 20)).astype(np.float32)
  ofs = np.full((1,), 2.0, np.float32) if spec.get("ofs") else None
  expected = diffusers_forward(reference, latents, timestep, context, ofs)
  out, stats = _forward(config)(params, latents, timestep, context, None,
                                None if ofs is None else ofs[0])
  assert stats == {}
  max_err = float(np.abs(np.asarray(out) - expected).max())
  record_property("max_abs_error", max_err)
  print(f"\n{case}: max |ours - diffusers| = {max_err:.3g} (output scale "
        f"{np.abs(expected).max():.3g})")
  chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------- positions

@pytest.mark.parametrize("version,latent_hw,frames", [
    ("5b", (60, 90), 13),     # the sample size: integer positions
    ("5b", (96, 170), 13),    # 768 x 1360: the crop-interpolated grid
    ("1.5", (96, 170), 11),   # slice grid, 22 latent frames patched by 2
], ids=lambda v: str(v))
def test_rope_tables_equal_diffusers(version, latent_hw, frames):
  pytest.importorskip("diffusers")
  from diffusers.models.embeddings import get_3d_rotary_pos_embed
  from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

  config = (CogVideoXConfig.cogvideox_5b() if version == "5b"
            else CogVideoXConfig.cogvideox1_5_5b())
  grid = (frames, latent_hw[0] // 2, latent_hw[1] // 2)
  base_w, base_h = config.sample_width // 2, config.sample_height // 2
  if version == "5b":
    crops = get_resize_crop_region_for_grid(grid[1:], base_w, base_h)
    cos, sin = get_3d_rotary_pos_embed(64, crops, grid[1:], frames)
  else:
    cos, sin = get_3d_rotary_pos_embed(64, None, grid[1:], frames, grid_type="slice",
                                       max_size=(base_h, base_w))
  ours = positions.rope_tables(config, grid)
  # diffusers repeats every pair's angle over its two channels
  for mine, theirs in zip(ours, (cos, sin)):
    np.testing.assert_allclose(np.asarray(mine), theirs.numpy()[:, ::2], atol=2e-5)
    np.testing.assert_array_equal(theirs.numpy()[:, ::2], theirs.numpy()[:, 1::2])


def test_sincos_embedding_equals_diffusers():
  pytest.importorskip("diffusers")
  from diffusers.models.embeddings import get_3d_sincos_pos_embed

  config = CogVideoXConfig.cogvideox_2b()
  t, h, w = 3, 5, 7
  expected = get_3d_sincos_pos_embed(config.dim, (w, h), t, 1.875, 1.0).reshape(-1, config.dim)
  np.testing.assert_allclose(np.asarray(positions.sincos_embedding(config, (t, h, w))),
                             expected.numpy(), atol=1e-6)


def test_crop_region_equals_diffusers():
  pytest.importorskip("diffusers")
  from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
  for grid in [(30, 45), (48, 85), (20, 20), (45, 30), (1, 7)]:
    assert positions.crop_region(grid, 45, 30) == get_resize_crop_region_for_grid(grid, 45, 30)


# ----------------------------------------------------------- the layout

@struct.dataclass
class _RecordingHook:
  """Dense attention that hands back q, k, v and its own layer slice as stats."""
  layer: jax.Array  # [L] int32: the scan slices it per layer

  def self_attention(self, q, k, v):
    return attention.dense_attention(q, k, v), {"q": q, "k": k, "v": v, "layer": self.layer}

  def cross_attention(self, q, k, v):
    raise AssertionError("CogVideoX has no cross-attention")


def test_hook_sees_joint_qkv_where_the_layout_says(params):
  """q/k/v are [B, text_len + video, H, D]; perturbing one video patch changes layer 0's
  q/k/v only at video_start + its token index, perturbing one text token only at its
  own position. (The output through the hook equals the dense model's: tested in the
  loop-layer test.)"""
  family = CogVideoXFamily(CFG, text_len=TEXT_LEN)
  layout = family.attention_layout(F, H, W)
  gh, gw = H // 2, W // 2
  assert (layout.seq_len, layout.video_start, layout.video_tokens, layout.tokens_per_frame) == (
      TEXT_LEN + F * gh * gw, TEXT_LEN, F * gh * gw, gh * gw)
  assert not layout.video_only
  p = params
  hook = _RecordingHook(jnp.arange(CFG.num_layers, dtype=jnp.int32))
  apply = jax.jit(family.apply)

  rng = np.random.default_rng(3)
  latents = rng.standard_normal((1, CFG.in_channels, F, H, W)).astype(np.float32)
  context = rng.standard_normal((1, TEXT_LEN, CFG.text_dim)).astype(np.float32)
  t = np.array([500.0], np.float32)
  _, stats = apply(p, latents, t, context, hook)  # its output is the dense one: see below
  for name in "qkv":
    chex.assert_shape(stats[name], (CFG.num_layers, 1, layout.seq_len, CFG.num_heads,
                                    CFG.head_dim))
  chex.assert_trees_all_equal(stats["layer"], np.arange(CFG.num_layers))

  def changed_tokens(latents2, context2):
    _, stats2 = apply(p, latents2, t, context2, hook)
    diff = sum(np.abs(np.asarray(stats2[n][0]) - np.asarray(stats[n][0])) for n in "qkv")
    return np.flatnonzero(diff.max(axis=(0, 2, 3)) > 0)

  frame, row, col = 2, 1, 3  # one 2x2 patch of latent frame 2
  bumped = latents.copy()
  bumped[:, :, frame, 2 * row:2 * row + 2, 2 * col:2 * col + 2] += 1.0
  token = (frame * gh + row) * gw + col
  np.testing.assert_array_equal(changed_tokens(bumped, context), [layout.video_start + token])
  bumped_text = context.copy()
  bumped_text[:, 3] += 1.0
  np.testing.assert_array_equal(changed_tokens(latents, bumped_text), [3])


def test_family_protocol_and_checks():
  family = CogVideoXFamily(CogVideoXConfig.cogvideox_5b())
  assert family.latent_channels == 16 and family.dtype == jnp.bfloat16
  layout = family.attention_layout(13, 60, 90)
  assert (layout.num_layers, layout.num_heads, layout.head_dim) == (42, 48, 64)
  assert (layout.video_start, layout.video_tokens, layout.tokens_per_frame) == (
      226, 13 * 30 * 45, 30 * 45)
  assert layout.seq_len == 226 + 17550
  layout = CogVideoXFamily(CogVideoXConfig.cogvideox1_5_5b(), text_len=128).attention_layout(
      22, 96, 170)
  assert (layout.video_start, layout.video_tokens, layout.tokens_per_frame) == (
      128, 11 * 48 * 85, 48 * 85)
  with pytest.raises(ValueError, match="frames=13 must be a positive multiple of the patch size 2"):
    CogVideoXFamily(CogVideoXConfig.cogvideox1_5_5b()).check_latent_size(13, 96, 170)
  with pytest.raises(ValueError, match="exceed the RoPE grid"):
    CogVideoXFamily(CogVideoXConfig.cogvideox1_5_5b()).check_latent_size(22, 302, 170)
  with pytest.raises(ValueError, match="width=91"):
    family.check_latent_size(13, 60, 91)
  with pytest.raises(ValueError, match="text-to-video"):
    CogVideoXFamily(CogVideoXConfig.cogvideox_5b(in_channels=32))
  with pytest.raises(ValueError, match="text_len"):
    CogVideoXFamily(CogVideoXConfig.cogvideox_5b(), text_len=0)


def test_family_apply_checks_the_text_length(params, inputs):
  latents, timestep, context = inputs
  with pytest.raises(ValueError, match="text_len=226"):
    CogVideoXFamily(CFG).apply(params, latents, timestep, context)


# ------------------------------------------------------------ model modes

@pytest.mark.parametrize("patch", [(2, 1), (2, 2), (1, 3)], ids=lambda p: f"p={p[0]}_pt={p[1]}")
def test_patchify_unpatchify_round_trip(patch):
  p, pt = patch
  x = np.random.default_rng(0).standard_normal((2, 3, 6, 4, 6))
  grid = (6 // pt, 4 // p, 6 // p)
  tokens = cogvideox.patchify(x, p, pt)
  chex.assert_shape(tokens, (2, np.prod(grid), 3 * pt * p * p))
  chex.assert_trees_all_equal(cogvideox.unpatchify(tokens, p, pt, grid), x)
  # frame-major tokens; each holds its own patch channel-major (C, pt, ph, pw)
  t, h, w = grid[0] - 1, grid[1] - 1, 0
  patch_values = x[:, :, t * pt:(t + 1) * pt, h * p:(h + 1) * p, w * p:(w + 1) * p]
  s = (t * grid[1] + h) * grid[2] + w
  chex.assert_trees_all_equal(tokens[:, s], patch_values.reshape(2, -1))


def test_loop_layers_equal_scanned_layers_and_slice_the_control(params, inputs):
  scanned, _ = _forward(CFG)(params, *inputs)
  loop_cfg = dataclasses.replace(CFG, scan_layers=False)
  loop_params = cogvideox.unstack_blocks(params, CFG.num_layers)
  chex.assert_trees_all_equal_shapes_and_dtypes(loop_params, cogvideox.param_shapes(loop_cfg))
  hook = _RecordingHook(jnp.arange(CFG.num_layers, dtype=jnp.int32))
  looped, stats = _forward(loop_cfg)(loop_params, *inputs, hook)
  chex.assert_trees_all_close(looped, scanned, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_equal(stats["layer"], np.arange(CFG.num_layers))
  chex.assert_shape(stats["q"], (CFG.num_layers, B, TEXT_LEN + F * (H // 2) * (W // 2),
                                 CFG.num_heads, CFG.head_dim))


@pytest.mark.slow
def test_init_params_matches_param_shapes():
  params = cogvideox.init_params(CFG, jax.random.key(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, cogvideox.param_shapes(CFG))


def test_bfloat16_compute_stays_close_to_float32(params, inputs):
  assert_bfloat16_close(_forward(CFG), _forward(dataclasses.replace(CFG, dtype="bfloat16")),
                        params, inputs)


def test_compiles_once_across_calls(params, inputs):
  assert_compiles_once(lambda p, x, t, c: cogvideox.apply(CFG, p, x, t, c), params, inputs)


@pytest.mark.parametrize("latent_shape,t_shape,ctx_shape,match", [
    ((B, 3, F, H, W), (B,), (B, TEXT_LEN, 24), "latents"),
    ((B, 4, F, H, 5), (B,), (B, TEXT_LEN, 24), "width=5"),
    ((B, 4, F, H, W), (B + 1,), (B, TEXT_LEN, 24), "timestep"),
    ((B, 4, F, H, W), (B,), (B, TEXT_LEN, 16), "context"),
], ids=["channels", "odd_width", "timestep_batch", "text_dim"])
def test_bad_inputs_raise(params, latent_shape, t_shape, ctx_shape, match):
  rng = np.random.default_rng(0)
  args = [rng.standard_normal(s).astype(np.float32) for s in (latent_shape, t_shape, ctx_shape)]
  with pytest.raises(ValueError, match=match):
    cogvideox.apply(CFG, params, *args)


def test_control_without_layer_axis_raises(params, inputs):
  hook = _RecordingHook(jnp.arange(CFG.num_layers + 1, dtype=jnp.int32))
  with pytest.raises(ValueError, match="num_layers=2"):
    cogvideox.apply(CFG, params, *inputs, hook)


def test_ofs_only_with_an_ofs_embedding(params, inputs):
  with pytest.raises(ValueError, match="ofs given"):
    _forward(CFG)(params, *inputs, None, 2.0)  # under jit: fails at trace time, no compile
  config = dataclasses.replace(CFG, ofs_embed_dim=CFG.time_embed_dim)
  with pytest.raises(ValueError, match="ofs is required"):
    _forward(config)(random_params(config), *inputs)
