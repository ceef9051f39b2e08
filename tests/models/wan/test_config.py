"""WanConfig: validation messages, presets, token counts, diffusers config round trip."""

import dataclasses

import jax.numpy as jnp
import pytest

from models.wan import WanConfig

BAD_FIELDS = [
    (dict(dim=65), "dim"),
    (dict(num_heads=0), "num_heads"),
    (dict(dim=8, num_heads=2), "head_dim"),       # head_dim 4 < 6
    (dict(dim=70, num_heads=2), "head_dim"),      # head_dim 35 is odd
    (dict(patch_size=(1, 2)), "patch_size"),
    (dict(patch_size=(1, 0, 2)), "patch_size"),
    (dict(freq_dim=255), "freq_dim"),
    (dict(eps=0.0), "eps"),
    (dict(qk_norm="rms_norm"), "qk_norm"),
    (dict(dtype="int8"), "dtype"),
    (dict(param_dtype="float64"), "param_dtype"),
    (dict(scan_layers=1), "scan_layers"),
    (dict(num_layers=2.0), "num_layers"),
]


@pytest.mark.parametrize("overrides,field", BAD_FIELDS,
                         ids=[f"{f}={list(o.values())[-1]!r}" for o, f in BAD_FIELDS])
def test_invalid_field_raises_naming_it(overrides, field):
  with pytest.raises(ValueError, match=field):
    WanConfig.tiny(**overrides)


@pytest.mark.parametrize("preset,layers,dim,heads", [
    ("tiny", 2, 64, 2), ("wan2_1_1_3b", 30, 1536, 12), ("wan2_1_14b", 40, 5120, 40)])
def test_presets(preset, layers, dim, heads):
  cfg = getattr(WanConfig, preset)()
  assert (cfg.num_layers, cfg.dim, cfg.num_heads) == (layers, dim, heads)
  assert cfg.patch_size == (1, 2, 2) and cfg.freq_dim == 256 and cfg.eps == 1e-6
  if preset != "tiny":
    assert cfg.head_dim == 128 and cfg.in_channels == cfg.out_channels == 16
    assert cfg.text_dim == 4096


def test_dtypes_normalised_and_hashable():
  cfg = WanConfig.tiny(dtype=jnp.bfloat16, param_dtype="float32")
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  assert hash(cfg) == hash(WanConfig.tiny(dtype="bfloat16"))


def test_tokens():
  cfg = WanConfig.wan2_1_1_3b()
  # Wan 480p, 81 frames: latent 21 x 60 x 104.
  assert cfg.tokens_per_frame(60, 104) == 30 * 52
  assert cfg.tokens(21, 60, 104) == 21 * 30 * 52
  with pytest.raises(ValueError, match="height"):
    cfg.tokens(21, 61, 104)


def test_diffusers_config_round_trip():
  cfg = WanConfig.wan2_1_14b(cross_attn_norm=False, out_channels=8)
  d = cfg.to_diffusers_config()
  assert d["attention_head_dim"] == 128 and d["num_attention_heads"] == 40
  back = WanConfig.from_diffusers_config(
      {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", **d},
      dtype="bfloat16")
  assert back == cfg


def test_diffusers_config_missing_keys_take_diffusers_defaults():
  cfg = WanConfig.from_diffusers_config({"num_attention_heads": 2, "attention_head_dim": 12})
  defaults = (cfg.num_layers, cfg.ffn_dim, cfg.text_dim, cfg.rope_max_seq_len)
  assert defaults == (40, 13824, 4096, 1024)


@pytest.mark.parametrize("key,value,match", [
    ("window_size", [-1, -1], "unknown config key 'window_size'"),
    ("image_dim", 1280, "'image_dim'.*not supported"),
    ("_class_name", "CogVideoXTransformer3DModel", "_class_name"),
], ids=["unknown_key", "image_to_video", "wrong_class"])
def test_diffusers_config_rejects(key, value, match):
  d = {**WanConfig.tiny().to_diffusers_config(), key: value}
  with pytest.raises(ValueError, match=match):
    WanConfig.from_diffusers_config(d)


def test_own_dict_round_trip_and_unknown_field():
  cfg = WanConfig.tiny(scan_layers=False, remat=True, dtype="bfloat16")
  assert WanConfig.from_dict(cfg.to_dict()) == cfg
  assert dataclasses.replace(cfg, remat=False) == WanConfig.from_dict(cfg.to_dict(), remat=False)
  with pytest.raises(ValueError, match="unknown WanConfig fields.*'colour'"):
    WanConfig.from_dict({**cfg.to_dict(), "colour": 1})
