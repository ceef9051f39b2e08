"""HunyuanVideoConfig: validation messages, presets, token counts, diffusers config."""

import dataclasses

import jax.numpy as jnp
import pytest

from models.hunyuan import HunyuanVideoConfig

BAD_FIELDS = [
    (dict(num_heads=0), "num_heads"),
    (dict(head_dim=15, rope_axes_dim=(4, 6, 5)), "rope_axes_dim"),   # odd axis
    (dict(rope_axes_dim=(4, 6)), "rope_axes_dim"),
    (dict(rope_axes_dim=(4, 6, 8)), "rope_axes_dim"),                # sums to 18, not 16
    (dict(num_layers=0, num_single_layers=0), "at least one block"),
    (dict(num_layers=-1), "num_layers"),
    (dict(num_single_layers=1.0), "num_single_layers"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(mlp_ratio=0.01), "mlp_ratio"),                             # int(32 * 0.01) = 0
    (dict(patch_size=0), "patch_size"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(qk_norm="layer_norm"), "qk_norm"),
    (dict(guidance_embeds=1), "guidance_embeds"),
    (dict(dtype="int8"), "dtype"),
    (dict(param_dtype="float64"), "param_dtype"),
    (dict(scan_layers=None), "scan_layers"),
]


@pytest.mark.parametrize("overrides,field", BAD_FIELDS,
                         ids=[f"{f}={list(o.values())[-1]!r}" for o, f in BAD_FIELDS])
def test_invalid_field_raises_naming_it(overrides, field):
  with pytest.raises(ValueError, match=field):
    HunyuanVideoConfig.tiny(**overrides)


def test_13b_preset():
  cfg = HunyuanVideoConfig.hunyuan_video()
  assert (cfg.num_layers, cfg.num_single_layers, cfg.num_refiner_layers) == (20, 40, 2)
  assert (cfg.num_heads, cfg.head_dim, cfg.dim, cfg.mlp_dim) == (24, 128, 3072, 12288)
  assert (cfg.text_dim, cfg.pooled_dim, cfg.in_channels, cfg.out_channels) == (4096, 768, 16, 16)
  assert cfg.rope_axes_dim == (16, 56, 56) and cfg.rope_theta == 256.0
  assert cfg.guidance_embeds and cfg.dtype == jnp.bfloat16
  assert cfg.num_attention_layers == 60 and cfg.patch == (1, 2, 2)


def test_tokens():
  cfg = HunyuanVideoConfig.hunyuan_video()
  # 720p, 129 frames: latent 33 x 90 x 160 -> 33 frames of 45 x 80 tokens.
  assert cfg.tokens_per_frame(90, 160) == 45 * 80
  assert cfg.tokens(33, 90, 160) == 33 * 45 * 80
  with pytest.raises(ValueError, match="height=91"):
    cfg.tokens(33, 91, 160)
  assert HunyuanVideoConfig.tiny(patch_size_t=2).grid(4, 4, 6) == (2, 2, 3)
  with pytest.raises(ValueError, match="frames=3"):
    HunyuanVideoConfig.tiny(patch_size_t=2).grid(3, 4, 6)


def test_dtypes_normalised_and_hashable():
  cfg = HunyuanVideoConfig.tiny(dtype=jnp.bfloat16, rope_axes_dim=[4, 6, 6])
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  assert hash(cfg) == hash(HunyuanVideoConfig.tiny(dtype="bfloat16"))


# Every key diffusers 0.42.1 writes for HunyuanVideoTransformer3DModel (the 13B values).
DIFFUSERS_13B = {
    "_class_name": "HunyuanVideoTransformer3DModel",
    "_diffusers_version": "0.32.0.dev0",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "image_condition_type": None,
    "in_channels": 16,
    "mlp_ratio": 4.0,
    "num_attention_heads": 24,
    "num_layers": 20,
    "num_refiner_layers": 2,
    "num_single_layers": 40,
    "out_channels": 16,
    "patch_size": 2,
    "patch_size_t": 1,
    "pooled_projection_dim": 768,
    "qk_norm": "rms_norm",
    "rope_axes_dim": [16, 56, 56],
    "rope_theta": 256.0,
    "text_embed_dim": 4096,
}


def test_from_diffusers_config_13b_and_round_trip():
  cfg = HunyuanVideoConfig.from_diffusers_config(DIFFUSERS_13B, dtype="bfloat16")
  assert cfg == HunyuanVideoConfig.hunyuan_video()
  ours = cfg.to_diffusers_config()
  assert ours == {k: v for k, v in DIFFUSERS_13B.items() if not k.startswith("_")}
  assert HunyuanVideoConfig.from_diffusers_config(ours) == dataclasses.replace(cfg, dtype="float32")


def test_from_diffusers_config_defaults_are_diffusers_defaults():
  assert HunyuanVideoConfig.from_diffusers_config({}) == HunyuanVideoConfig.hunyuan_video(
      dtype="float32")
  assert HunyuanVideoConfig.from_diffusers_config({"out_channels": None}).out_channels == 16


def test_every_diffusers_key_is_known():
  diffusers = pytest.importorskip("diffusers")
  import inspect
  params = inspect.signature(diffusers.HunyuanVideoTransformer3DModel.__init__).parameters
  assert set(params) - {"self"} == set(HunyuanVideoConfig.hunyuan_video().to_diffusers_config())


@pytest.mark.parametrize("key,value,match", [
    ("image_condition_type", "token_replace", "image_condition_type"),
    ("image_condition_type", "latent_concat", "image_condition_type"),
    ("qk_norm", "layer_norm", "qk_norm"),
    ("use_linear_projection", True, "use_linear_projection"),
    ("_class_name", "WanTransformer3DModel", "_class_name"),
    ("rope_axes_dim", [16, 56, 48], "rope_axes_dim"),
], ids=lambda v: str(v))
def test_unsupported_diffusers_options_raise_naming_the_key(key, value, match):
  with pytest.raises(ValueError, match=match):
    HunyuanVideoConfig.from_diffusers_config({**DIFFUSERS_13B, key: value})


def test_own_dict_round_trip():
  cfg = HunyuanVideoConfig.tiny(scan_layers=False, dtype="bfloat16")
  assert HunyuanVideoConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown HunyuanVideoConfig fields"):
    HunyuanVideoConfig.from_dict({**cfg.to_dict(), "dim": 32})
