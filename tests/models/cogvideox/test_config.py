"""CogVideoXConfig: presets against the released checkpoints' config.json, the full-size
tensor names and shapes against diffusers' own modules (meta device), diffusers config
round trips and errors."""

import dataclasses

import jax.numpy as jnp
import pytest

from models import cogvideox
from models.cogvideox import CogVideoXConfig
from models.cogvideox.config import _DIFFUSERS_DEFAULTS

# The transformer/config.json of the THUDM checkpoints, as diffusers writes them.
_COMMON = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64,
               dropout=0.0, flip_sin_to_cos=True, freq_shift=0, in_channels=16,
               max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-05,
               out_channels=16, patch_size=2, sample_frames=49, sample_height=60,
               sample_width=90, spatial_interpolation_scale=1.875, temporal_compression_ratio=4,
               temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512,
               timestep_activation_fn="silu", _class_name="CogVideoXTransformer3DModel",
               _diffusers_version="0.30.0.dev0")
RELEASED = {
    "CogVideoX-2b": ({**_COMMON, "num_attention_heads": 30, "num_layers": 30},
                     CogVideoXConfig.cogvideox_2b),
    "CogVideoX-5b": ({**_COMMON, "num_attention_heads": 48, "num_layers": 42,
                      "use_rotary_positional_embeddings": True},
                     CogVideoXConfig.cogvideox_5b),
    "CogVideoX1.5-5B": ({**_COMMON, "num_attention_heads": 48, "num_layers": 42,
                         "use_rotary_positional_embeddings": True,
                         "use_learned_positional_embeddings": False, "patch_bias": False,
                         "patch_size_t": 2, "sample_frames": 81, "sample_height": 300,
                         "sample_width": 300}, CogVideoXConfig.cogvideox1_5_5b),
    "CogVideoX-5b-I2V": ({**_COMMON, "num_attention_heads": 48, "num_layers": 42,
                          "in_channels": 32, "use_rotary_positional_embeddings": True,
                          "use_learned_positional_embeddings": True}, None),
    "CogVideoX1.5-5B-I2V": ({**_COMMON, "num_attention_heads": 48, "num_layers": 42,
                             "in_channels": 32, "ofs_embed_dim": 512, "patch_bias": False,
                             "patch_size_t": 2, "sample_frames": 81, "sample_height": 300,
                             "sample_width": 300, "use_rotary_positional_embeddings": True,
                             "use_learned_positional_embeddings": False}, None),
}


@pytest.mark.parametrize("name", list(RELEASED), ids=list(RELEASED))
def test_full_size_names_and_shapes_equal_diffusers(name):
  """Every tensor of the real model, by diffusers' own module tree on the meta device."""
  torch = pytest.importorskip("torch")
  from diffusers import CogVideoXTransformer3DModel

  raw, preset = RELEASED[name]
  config = CogVideoXConfig.from_diffusers_config(raw)
  if preset is not None:
    assert config == preset(dtype="float32")
  with torch.device("meta"):
    model = CogVideoXTransformer3DModel.from_config(raw)
  expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert cogvideox.diffusers_tensor_shapes(config) == expected
  assert CogVideoXConfig.from_diffusers_config(config.to_diffusers_config()) == config


def test_presets():
  assert CogVideoXConfig.cogvideox_2b().dim == 1920 and not CogVideoXConfig.cogvideox_2b().use_rotary
  five = CogVideoXConfig.cogvideox_5b()
  assert (five.dim, five.ffn_dim, five.dtype) == (3072, 12288, jnp.bfloat16)
  one_five = CogVideoXConfig.cogvideox1_5_5b()
  assert one_five.temporal_patch == 2 and one_five.has_patch_bias and one_five.patch_features == 128
  assert CogVideoXConfig.tiny().head_dim == 16


def test_missing_keys_take_diffusers_defaults():
  config = CogVideoXConfig.from_diffusers_config({})
  assert (config.num_heads, config.num_layers, config.use_rotary) == (30, 30, False)
  assert config == CogVideoXConfig.cogvideox_2b(dtype="float32")
  assert set(config.to_diffusers_config()) == set(_DIFFUSERS_DEFAULTS)


def test_overrides_set_our_fields():
  config = CogVideoXConfig.from_diffusers_config(RELEASED["CogVideoX-5b"][0], dtype="bfloat16",
                                                 scan_layers=False)
  assert config.dtype == jnp.bfloat16 and not config.scan_layers


def test_dict_round_trip():
  config = CogVideoXConfig.cogvideox1_5_5b(param_dtype="bfloat16")
  assert CogVideoXConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="unknown CogVideoXConfig fields"):
    CogVideoXConfig.from_dict({**config.to_dict(), "magic": 1})


@pytest.mark.parametrize("change,match", [
    (dict(use_magic=True), "unknown config key 'use_magic'"),
    (dict(_class_name="WanTransformer3DModel"), "_class_name must be one of"),
    (dict(timestep_activation_fn="gelu"), "'timestep_activation_fn'='gelu' is not supported"),
    (dict(activation_fn="geglu"), "'activation_fn'='geglu' is not supported"),
    (dict(use_rotary_positional_embeddings=False, use_learned_positional_embeddings=True),
     "use_learned_positional_embeddings=True needs"),
    (dict(use_rotary_positional_embeddings=True, attention_head_dim=40), "multiple of 16"),
    (dict(patch_size_t=2), "sin-cos position embedding"),
    (dict(ofs_embed_dim=256), "ofs_embed_dim \\(256\\) must equal time_embed_dim"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(norm_eps=-1.0), "norm_eps must be a finite number > 0"),
], ids=["unknown_key", "class", "timestep_act", "activation", "learned_without_rope",
        "rope_head_dim", "sincos_temporal_patch", "ofs_dim", "layers", "eps"])
def test_diffusers_config_errors(change, match):
  with pytest.raises(ValueError, match=match):
    CogVideoXConfig.from_diffusers_config({**RELEASED["CogVideoX-2b"][0], **change})


def test_field_errors():
  with pytest.raises(ValueError, match="dtype must be one of"):
    CogVideoXConfig.tiny(dtype="int8")
  with pytest.raises(ValueError, match="use_rotary must be a bool"):
    CogVideoXConfig.tiny(use_rotary=1)
  with pytest.raises(ValueError, match="freq_shift must be < dim // 2"):
    CogVideoXConfig.tiny(freq_shift=16)
  with pytest.raises(ValueError, match="ffn_dim=64: diffusers' model only has 4 \\* dim"):
    CogVideoXConfig.tiny(ffn_dim=64).to_diffusers_config()
  with pytest.raises(ValueError, match="learned position embedding only takes the sample size"):
    CogVideoXConfig.tiny(use_learned_positional_embeddings=True).grid(3, 6, 10)
  assert dataclasses.replace(CogVideoXConfig.tiny(), ffn_dim=None).ffn_dim == 128
