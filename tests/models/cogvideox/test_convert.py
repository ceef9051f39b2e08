"""Weight conversion: what our writer produces diffusers reads back tensor for tensor,
save/load round trips (diffusers format, sharded, our own checkpoints) and loader errors.
Forward parity with diffusers through the converter is in test_transformer.py."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import cogvideox
from models.cogvideox import CogVideoXConfig
from models.cogvideox import convert as loading
from tests.models.cogvideox.helpers import seeded_diffusers_model
from tests.models.helpers import edit_config, edit_weights, random_params

CFG = CogVideoXConfig.tiny()
WEIGHTS = loading.WEIGHTS_NAME


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture
def diffusers_dir(tmp_path, params):
  cogvideox.save_diffusers_transformer(CFG, params, tmp_path / "transformer")
  return tmp_path / "transformer"


@pytest.mark.parametrize("kwargs", [dict(use_rotary_positional_embeddings=True),
                                    dict(use_rotary_positional_embeddings=True, patch_size_t=2,
                                         patch_bias=False)],
                         ids=["1.0_conv_patches", "1.5_linear_patches"])
def test_diffusers_reads_back_what_we_write(tmp_path, kwargs):
  """diffusers -> ours -> diffusers: same config, same tensors (strict load)."""
  pytest.importorskip("diffusers")
  import safetensors.torch
  from diffusers import CogVideoXTransformer3DModel

  reference = seeded_diffusers_model(**kwargs)
  reference.save_pretrained(tmp_path / "ref")
  config, params = cogvideox.load_diffusers_transformer(tmp_path / "ref")
  cogvideox.save_diffusers_transformer(config, params, tmp_path / "ours")
  bookkeeping = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
  ours_config = CogVideoXTransformer3DModel.load_config(tmp_path / "ours")
  assert bookkeeping(ours_config) == bookkeeping(
      CogVideoXTransformer3DModel.load_config(tmp_path / "ref"))
  reread = CogVideoXTransformer3DModel.from_config(ours_config)
  reread.load_state_dict(safetensors.torch.load_file(tmp_path / "ours" / WEIGHTS), strict=True)
  ref_state, our_state = reference.state_dict(), reread.state_dict()
  assert ref_state.keys() == our_state.keys()
  for name in ref_state:
    np.testing.assert_array_equal(our_state[name].numpy(), ref_state[name].numpy(), err_msg=name)


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"{s=}")
@pytest.mark.parametrize("max_shard_size", [10 * 2**30, 32 * 1024], ids=["single", "sharded"])
def test_diffusers_round_trip(tmp_path, params, scan_layers, max_shard_size):
  config = dataclasses.replace(CFG, scan_layers=scan_layers)
  p = params if scan_layers else cogvideox.unstack_blocks(params, CFG.num_layers)
  cogvideox.save_diffusers_transformer(config, p, tmp_path, max_shard_size=max_shard_size)
  shards = sorted(tmp_path.glob("*.safetensors"))
  assert len(shards) == 1 if max_shard_size > 2**20 else len(shards) > 1
  assert (tmp_path / loading.INDEX_NAME).exists() == (len(shards) > 1)
  loaded_config, loaded = cogvideox.load_diffusers_transformer(tmp_path,
                                                               scan_layers=not scan_layers)
  assert loaded_config == dataclasses.replace(config, scan_layers=not scan_layers)
  expected = cogvideox.unstack_blocks(params, CFG.num_layers) if scan_layers else params
  chex.assert_trees_all_equal(loaded, expected)


def test_diffusers_layout_of_a_few_tensors(diffusers_dir, params):
  tensors = load_file(diffusers_dir / WEIGHTS)
  blocks = params["transformer_blocks"]
  np.testing.assert_array_equal(tensors["transformer_blocks.1.attn1.to_out.0.weight"],
                                np.asarray(blocks["attn1"]["to_out"]["kernel"][1]).T)
  np.testing.assert_array_equal(tensors["transformer_blocks.0.ff.net.0.proj.bias"],
                                blocks["ff"]["proj_in"]["bias"][0])
  np.testing.assert_array_equal(tensors["transformer_blocks.0.attn1.norm_k.weight"],
                                blocks["attn1"]["norm_k"]["scale"][0])
  np.testing.assert_array_equal(tensors["transformer_blocks.1.norm2.linear.weight"],
                                np.asarray(blocks["norm2"]["linear"]["kernel"][1]).T)
  assert tensors["patch_embed.proj.weight"].shape == (CFG.dim, CFG.in_channels, 2, 2)
  assert "patch_embed.pos_embedding" not in tensors


def test_patch_embedding_equals_conv2d(diffusers_dir, params):
  """The converted Dense over `patchify` tokens is diffusers' per-frame strided Conv2d."""
  weight = load_file(diffusers_dir / WEIGHTS)["patch_embed.proj.weight"]  # [dim, C, p, p]
  x = np.random.default_rng(0).standard_normal((1, CFG.in_channels, 1, 4, 6)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(x[:, :, 0], weight, window_strides=(2, 2), padding="VALID",
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))
  dense = cogvideox.patchify(x, 2) @ params["patch_embed"]["proj"]["kernel"]
  chex.assert_trees_all_close(dense, conv.reshape(1, CFG.dim, -1).transpose(0, 2, 1),
                              atol=1e-5, rtol=1e-5)


def test_pipeline_folder_resolves_transformer_subfolder(diffusers_dir):
  config, _ = cogvideox.load_diffusers_transformer(diffusers_dir.parent)
  assert config == CFG


@pytest.mark.parametrize("saved_scan,loaded_scan", [(True, True), (True, False), (False, True)],
                         ids=["scan_to_scan", "scan_to_loop", "loop_to_scan"])
def test_own_checkpoint_round_trip(tmp_path, params, saved_scan, loaded_scan):
  config = dataclasses.replace(CFG, scan_layers=saved_scan)
  p = params if saved_scan else cogvideox.unstack_blocks(params, CFG.num_layers)
  cogvideox.save_params(config, p, tmp_path / "cog.safetensors")
  assert json.loads((tmp_path / "cog.json").read_text())["scan_layers"] == saved_scan
  loaded_config, loaded = cogvideox.load_params(tmp_path / "cog.safetensors",
                                                scan_layers=loaded_scan)
  assert loaded_config == dataclasses.replace(config, scan_layers=loaded_scan)
  expected = params if loaded_scan else cogvideox.unstack_blocks(params, CFG.num_layers)
  chex.assert_trees_all_equal(loaded, expected)


def test_param_dtype_override(diffusers_dir):
  config, loaded = cogvideox.load_diffusers_transformer(diffusers_dir, param_dtype="bfloat16")
  assert config.param_dtype == jnp.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(loaded, cogvideox.param_shapes(config))


# ------------------------------------------------------------------ errors

def test_unknown_config_key_raises(diffusers_dir):
  edit_config(diffusers_dir, use_magic=True)
  with pytest.raises(ValueError, match="unknown config key 'use_magic'"):
    cogvideox.load_diffusers_transformer(diffusers_dir)


def test_wrong_shape_names_the_tensor(diffusers_dir):
  name = "transformer_blocks.1.attn1.to_k.weight"
  edit_weights(diffusers_dir, WEIGHTS, lambda t: t.update({name: t[name][:, :-1].copy()}))
  with pytest.raises(ValueError, match=rf"'{name}'.*expected shape \(32, 32\), got \(32, 31\)"):
    cogvideox.load_diffusers_transformer(diffusers_dir)


def test_missing_and_unexpected_tensors_are_listed(diffusers_dir):
  def edit(t):
    t["patch_embed.pos_embedding"] = np.zeros((1, 3, CFG.dim), np.float32)
    del t["norm_out.linear.bias"]
  edit_weights(diffusers_dir, WEIGHTS, edit)
  with pytest.raises(ValueError, match=r"missing \(1\): norm_out\.linear\.bias[\s\S]*"
                                       r"unexpected \(1\): patch_embed\.pos_embedding"):
    cogvideox.load_diffusers_transformer(diffusers_dir)


def test_config_disagreeing_with_weights_names_the_tensor(diffusers_dir):
  edit_config(diffusers_dir, time_embed_dim=48)
  # the first tensor of the time-embedding width found is named, whichever it is
  with pytest.raises(ValueError, match=r"tensor '[\w.]+' in .*: expected shape \((\d+, )?48"):
    cogvideox.load_diffusers_transformer(diffusers_dir)


def test_missing_folder_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cogvideox.load_diffusers_transformer(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    cogvideox.load_diffusers_transformer(tmp_path)
