"""Weight conversion: parity with a seeded diffusers WanTransformer3DModel, save/load
round trips (diffusers format, sharded, our own checkpoints) and loader errors."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import wan
from models.wan import WanConfig, convert as loading
from tests.models.helpers import edit_config, edit_weights, random_params

CFG = WanConfig.tiny()
WEIGHTS = loading.WEIGHTS_NAME




@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture
def diffusers_dir(tmp_path, params):
  wan.save_diffusers_transformer(CFG, params, tmp_path / "transformer")
  return tmp_path / "transformer"


# ------------------------------------------------------------------ parity

PARITY_CASES = {
    "heads=2_head_dim=12_patch=1x2x2_scan": dict(
        diffusers=dict(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                       out_channels=4, patch_size=(1, 2, 2), cross_attn_norm=True),
        latent=(2, 4, 3, 6, 4), scan_layers=True),
    "heads=3_head_dim=16_patch=2x2x2_no_cross_norm_loop": dict(
        diffusers=dict(num_attention_heads=3, attention_head_dim=16, in_channels=5,
                       out_channels=3, patch_size=(2, 2, 2), cross_attn_norm=False),
        latent=(2, 5, 4, 4, 6), scan_layers=False),
}


def _seeded_diffusers_model(**kwargs):
  import torch
  from diffusers import WanTransformer3DModel

  torch.manual_seed(0)
  model = WanTransformer3DModel(text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2,
                                rope_max_seq_len=64, **kwargs).eval()
  with torch.no_grad():  # norms and modulation tables away from their trivial init
    for name, p in model.named_parameters():
      if "norm" in name or "scale_shift_table" in name:
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.5 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("case", list(PARITY_CASES), ids=list(PARITY_CASES))
def test_parity_with_diffusers(case, tmp_path, record_property):
  pytest.importorskip("diffusers")
  import safetensors.torch
  import torch
  from diffusers import WanTransformer3DModel

  spec = PARITY_CASES[case]
  reference = _seeded_diffusers_model(**spec["diffusers"])
  reference.save_pretrained(tmp_path / "ref")
  config, params = wan.load_diffusers_transformer(tmp_path / "ref",
                                                     scan_layers=spec["scan_layers"])
  assert config.num_layers == 2 and config.scan_layers == spec["scan_layers"]

  rng = np.random.default_rng(1)
  latents = rng.standard_normal(spec["latent"]).astype(np.float32)
  timestep = np.array([3.5, 871.0], np.float32)
  context = rng.standard_normal((2, 7, 16)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(latents), torch.from_numpy(timestep),
                         torch.from_numpy(context), return_dict=False)[0].numpy()
  out, stats = jax.jit(lambda p: wan.apply(config, p, latents, timestep, context))(params)
  assert stats == {}
  max_err = float(np.abs(np.asarray(out) - expected).max())
  record_property("max_abs_error", max_err)
  print(f"\n{case}: max |ours - diffusers| = {max_err:.3g} (output scale "
        f"{np.abs(expected).max():.3g})")
  chex.assert_trees_all_close(out, expected, atol=2e-5, rtol=1e-5)

  # Our writer produces what diffusers reads back, tensor for tensor (strict load;
  # from_pretrained itself needs accelerate for this model class).
  wan.save_diffusers_transformer(config, params, tmp_path / "ours")
  bookkeeping = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
  ours_config = WanTransformer3DModel.load_config(tmp_path / "ours")
  ref_config = WanTransformer3DModel.load_config(tmp_path / "ref")
  assert bookkeeping(ours_config) == bookkeeping(ref_config)
  reread = WanTransformer3DModel.from_config(ours_config)
  reread.load_state_dict(safetensors.torch.load_file(tmp_path / "ours" / WEIGHTS), strict=True)
  ref_state, our_state = reference.state_dict(), reread.state_dict()
  assert ref_state.keys() == our_state.keys()
  for name in ref_state:
    np.testing.assert_array_equal(our_state[name].numpy(), ref_state[name].numpy(), err_msg=name)


# -------------------------------------------------------------- round trips

@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"{s=}")
@pytest.mark.parametrize("max_shard_size", [10 * 2**30, 64 * 1024], ids=["single", "sharded"])
def test_diffusers_round_trip(tmp_path, params, scan_layers, max_shard_size):
  config = dataclasses.replace(CFG, scan_layers=scan_layers)
  p = params if scan_layers else wan.unstack_blocks(params, CFG.num_layers)
  wan.save_diffusers_transformer(config, p, tmp_path, max_shard_size=max_shard_size)
  shards = sorted(tmp_path.glob("*.safetensors"))
  assert len(shards) == 1 if max_shard_size > 2**20 else len(shards) > 1
  assert (tmp_path / loading.INDEX_NAME).exists() == (len(shards) > 1)

  # Reloading into the other layout exercises stacking and unstacking.
  loaded_config, loaded = wan.load_diffusers_transformer(tmp_path, scan_layers=not scan_layers)
  assert loaded_config == dataclasses.replace(config, scan_layers=not scan_layers)
  expected = wan.unstack_blocks(params, CFG.num_layers) if scan_layers else params
  chex.assert_trees_all_equal(loaded, expected)


def test_diffusers_layout_of_a_few_tensors(diffusers_dir, params):
  tensors = load_file(diffusers_dir / WEIGHTS)
  np.testing.assert_array_equal(tensors["blocks.1.attn1.to_out.0.weight"],
                                np.asarray(params["blocks"]["attn1"]["to_out"]["kernel"][1]).T)
  np.testing.assert_array_equal(tensors["blocks.0.ffn.net.0.proj.bias"],
                                params["blocks"]["ffn"]["proj_in"]["bias"][0])
  np.testing.assert_array_equal(tensors["blocks.0.attn2.norm_k.weight"],
                                params["blocks"]["attn2"]["norm_k"]["scale"][0])
  assert tensors["patch_embedding.weight"].shape == (CFG.dim, CFG.in_channels, 1, 2, 2)
  assert tensors["scale_shift_table"].shape == (1, 2, CFG.dim)


def test_patch_embedding_equals_conv3d(diffusers_dir, params):
  """The converted Dense over `patchify` tokens is diffusers' strided Conv3d."""
  weight = load_file(diffusers_dir / WEIGHTS)["patch_embedding.weight"]  # [dim, C, pt, ph, pw]
  x = np.random.default_rng(0).standard_normal((1, CFG.in_channels, 2, 4, 6)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(x, weight, window_strides=CFG.patch_size, padding="VALID",
                                      dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
  dense = wan.patchify(x, CFG.patch_size) @ params["patch_embedding"]["kernel"]
  chex.assert_trees_all_close(dense, conv.reshape(1, CFG.dim, -1).transpose(0, 2, 1),
                              atol=1e-5, rtol=1e-5)


def test_pipeline_folder_resolves_transformer_subfolder(diffusers_dir):
  config, _ = wan.load_diffusers_transformer(diffusers_dir.parent)
  assert config == CFG


@pytest.mark.parametrize("saved_scan,loaded_scan", [(True, True), (True, False), (False, True)],
                         ids=["scan_to_scan", "scan_to_loop", "loop_to_scan"])
def test_own_checkpoint_round_trip(tmp_path, params, saved_scan, loaded_scan):
  config = dataclasses.replace(CFG, scan_layers=saved_scan)
  p = params if saved_scan else wan.unstack_blocks(params, CFG.num_layers)
  wan.save_params(config, p, tmp_path / "demo.safetensors")
  assert json.loads((tmp_path / "demo.json").read_text())["scan_layers"] == saved_scan
  loaded_config, loaded = wan.load_params(tmp_path / "demo.safetensors",
                                             scan_layers=loaded_scan)
  assert loaded_config == dataclasses.replace(config, scan_layers=loaded_scan)
  expected = params if loaded_scan else wan.unstack_blocks(params, CFG.num_layers)
  chex.assert_trees_all_equal(loaded, expected)


def test_own_checkpoint_param_dtype_override(tmp_path, params):
  wan.save_params(CFG, params, tmp_path / "demo.safetensors")
  config, loaded = wan.load_params(tmp_path / "demo.safetensors", param_dtype="bfloat16")
  assert config.param_dtype == jnp.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(loaded, wan.param_shapes(config))


# ------------------------------------------------------------------ errors

def test_unknown_config_key_raises(diffusers_dir):
  edit_config(diffusers_dir, use_magic=True)
  with pytest.raises(ValueError, match="unknown config key 'use_magic'"):
    wan.load_diffusers_transformer(diffusers_dir)


def test_wrong_shape_names_the_tensor(diffusers_dir):
  name = "blocks.1.attn2.to_k.weight"
  edit_weights(diffusers_dir, WEIGHTS, lambda t: t.update({name: t[name][:, :-1].copy()}))
  with pytest.raises(ValueError, match=rf"'{name}'.*expected shape \(64, 64\), got \(64, 63\)"):
    wan.load_diffusers_transformer(diffusers_dir)


def test_config_disagreeing_with_weights_names_the_tensor(diffusers_dir):
  edit_config(diffusers_dir, ffn_dim=96)
  name = r"'blocks\.0\.ffn\.net\.0\.proj\.(weight|bias)'"
  with pytest.raises(ValueError, match=name + r".*expected shape \(96"):
    wan.load_diffusers_transformer(diffusers_dir)


def test_missing_and_unexpected_tensors_are_named(diffusers_dir):
  def edit(tensors):
    del tensors["blocks.0.attn1.norm_q.weight"]
    tensors["blocks.0.attn1.lora_A.weight"] = np.ones((2, 2), np.float32)
  edit_weights(diffusers_dir, WEIGHTS, edit)
  with pytest.raises(ValueError) as error:
    wan.load_diffusers_transformer(diffusers_dir)
  assert "missing (1): blocks.0.attn1.norm_q.weight" in str(error.value)
  assert "unexpected (1): blocks.0.attn1.lora_A.weight" in str(error.value)


def test_layer_count_mismatch_reports_missing_layer(diffusers_dir):
  edit_config(diffusers_dir, num_layers=3)
  with pytest.raises(ValueError, match=r"missing \(\d+\): blocks\.2\."):
    wan.load_diffusers_transformer(diffusers_dir)


@pytest.mark.parametrize("remove", ["folder", "config.json", WEIGHTS])
def test_missing_files_raise_file_not_found(diffusers_dir, tmp_path, remove):
  target = diffusers_dir / "nowhere" if remove == "folder" else diffusers_dir / remove
  if remove != "folder":
    target.unlink()
  with pytest.raises(FileNotFoundError, match=remove if remove != "folder" else "nowhere"):
    wan.load_diffusers_transformer(diffusers_dir / "nowhere" if remove == "folder"
                                      else diffusers_dir)


def test_missing_shard_raises_file_not_found(tmp_path, params):
  wan.save_diffusers_transformer(CFG, params, tmp_path, max_shard_size=64 * 1024)
  shard = sorted(tmp_path.glob("*-of-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    wan.load_diffusers_transformer(tmp_path)


def test_save_rejects_params_of_another_config(tmp_path, params):
  with pytest.raises(ValueError, match=r"'condition_embedder.text_embedder.linear_1.kernel'"):
    wan.save_diffusers_transformer(dataclasses.replace(CFG, text_dim=48), params, tmp_path)


def test_save_rejects_a_layer_count_mismatch(tmp_path, params):
  with pytest.raises(ValueError, match=r"'blocks\.attn1\.norm_k\.scale'.*num_layers=1"):
    wan.save_params(WanConfig.tiny(num_layers=1), params, tmp_path / "demo.safetensors")


def test_own_checkpoint_errors(tmp_path, params):
  with pytest.raises(ValueError, match=r"\.safetensors"):
    wan.save_params(CFG, params, tmp_path / "demo.npz")
  with pytest.raises(FileNotFoundError, match="absent.safetensors"):
    wan.load_params(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("preset", ["wan2_1_1_3b", "wan2_1_14b"])
def test_full_size_mapping_matches_diffusers_on_the_meta_device(preset):
  """Every tensor name and shape our converter expects for the real Wan2.1-1.3B / 14B
  transformer equals the state dict of diffusers' model built on torch's meta device
  (no weights allocated on either side)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = getattr(WanConfig, preset)(scan_layers=False)
  with torch.device("meta"):
    model = diffusers.WanTransformer3DModel(**config.to_diffusers_config())
  theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
  ours = loading.diffusers_tensor_shapes(config)
  ignored = {n for n in theirs if any(i in n for i in loading._IGNORED_UNEXPECTED)}
  assert set(ours) == set(theirs) - ignored
  assert {n: theirs[n] for n in ours} == ours
  params = sum(np.prod(s) for s in ours.values())
  assert (params / 1e9) == pytest.approx({"wan2_1_1_3b": 1.42, "wan2_1_14b": 14.3}[preset], rel=0.03)
