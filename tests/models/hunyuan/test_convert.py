"""Weight conversion: parity with seeded diffusers HunyuanVideoTransformer3DModels
(padded text, embedded guidance), the 13B name/shape mapping on torch's meta device,
save/load round trips and loader errors."""

import json

import chex
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import hunyuan
from models.hunyuan import HunyuanVideoConfig, HunyuanVideoContext, convert
from tests.models.helpers import random_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CFG = HunyuanVideoConfig.tiny()
WEIGHTS = convert.WEIGHTS_NAME

PARITY_CASES = {
    "dual=1_single=1_guidance_padded_text_scan": dict(
        diffusers=dict(num_layers=1, num_single_layers=1, num_refiner_layers=1,
                       num_attention_heads=2, attention_head_dim=16, rope_axes_dim=(4, 6, 6),
                       patch_size=2, patch_size_t=1, guidance_embeds=True),
        latent=(2, 4, 3, 4, 6), lengths=[7, 4], scan_layers=True),
    "dual=2_single=1_refiner=2_no_guidance_patch_t=2_loop": dict(
        diffusers=dict(num_layers=2, num_single_layers=1, num_refiner_layers=2,
                       num_attention_heads=3, attention_head_dim=8, rope_axes_dim=(2, 2, 4),
                       patch_size=2, patch_size_t=2, guidance_embeds=False),
        latent=(2, 4, 4, 4, 2), lengths=[7, 7], scan_layers=False),
}


def _seeded_diffusers_model(**kwargs):
  from diffusers import HunyuanVideoTransformer3DModel

  torch.manual_seed(0)
  model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, mlp_ratio=2.0,
                                         text_embed_dim=24, pooled_projection_dim=12,
                                         **kwargs).eval()
  with torch.no_grad():  # norm weights away from their trivial init (adaLN linears stay)
    for name, p in model.named_parameters():
      if "norm" in name and ".linear." not in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("case", list(PARITY_CASES), ids=list(PARITY_CASES))
def test_parity_with_diffusers(case, tmp_path, record_property):
  from diffusers import HunyuanVideoTransformer3DModel

  spec = PARITY_CASES[case]
  reference = _seeded_diffusers_model(**spec["diffusers"])
  reference.save_pretrained(tmp_path / "ref")
  config, params = hunyuan.load_diffusers_transformer(tmp_path / "ref",
                                                      scan_layers=spec["scan_layers"])
  assert config.scan_layers == spec["scan_layers"]
  assert config.guidance_embeds == spec["diffusers"]["guidance_embeds"]

  rng = np.random.default_rng(1)
  batch, text_len = spec["latent"][0], 7
  latents = rng.standard_normal(spec["latent"]).astype(np.float32)
  timestep = np.array([3.5, 871.0], np.float32)
  text = rng.standard_normal((batch, text_len, 24)).astype(np.float32)
  pooled = rng.standard_normal((batch, 12)).astype(np.float32)
  mask = (np.arange(text_len)[None] < np.asarray(spec["lengths"])[:, None]).astype(np.int64)
  guidance = np.array([6000.0, 3500.0], np.float32) if config.guidance_embeds else None
  with torch.no_grad():
    expected = reference(
        torch.from_numpy(latents), torch.from_numpy(timestep), torch.from_numpy(text),
        torch.from_numpy(mask), torch.from_numpy(pooled),
        guidance=None if guidance is None else torch.from_numpy(guidance),
        return_dict=False)[0].numpy()
  # Our context carries no mask when every token is real (diffusers gets all ones).
  full = bool(mask.all())
  context = HunyuanVideoContext(text=text, pooled=pooled, text_mask=None if full else mask,
                                guidance=guidance)
  out, stats = jax.jit(lambda p: hunyuan.apply(config, p, latents, timestep, context))(params)
  assert stats == {}
  max_err = float(np.abs(np.asarray(out) - expected).max())
  record_property("max_abs_error", max_err)
  print(f"\n{case}: max |ours - diffusers| = {max_err:.3g} (output scale "
        f"{np.abs(expected).max():.3g})")
  chex.assert_trees_all_close(out, expected, atol=3e-5, rtol=1e-5)

  # Our writer produces what diffusers reads back, tensor for tensor (strict load).
  hunyuan.save_diffusers_transformer(config, params, tmp_path / "ours")
  bookkeeping = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
  ours_config = HunyuanVideoTransformer3DModel.load_config(tmp_path / "ours")
  ref_config = HunyuanVideoTransformer3DModel.load_config(tmp_path / "ref")
  assert bookkeeping(ours_config) == bookkeeping(ref_config)
  reread = HunyuanVideoTransformer3DModel.from_config(ours_config)
  written = load_file(tmp_path / "ours" / WEIGHTS)
  reread.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
  ref_state, our_state = reference.state_dict(), reread.state_dict()
  for name in ref_state:
    np.testing.assert_array_equal(our_state[name].numpy(), ref_state[name].numpy(), err_msg=name)


def test_13b_names_and_shapes_match_diffusers_on_the_meta_device():
  from diffusers import HunyuanVideoTransformer3DModel

  with torch.device("meta"):
    model = HunyuanVideoTransformer3DModel()  # diffusers' defaults are the 13B model
  theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
  config = HunyuanVideoConfig.from_diffusers_config(dict(model.config))
  assert config == HunyuanVideoConfig.hunyuan_video(dtype="float32")
  ours = hunyuan.diffusers_shapes(config)
  assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
  assert ours == theirs
  assert len(ours) == 1264
  assert sum(int(np.prod(s)) for s in ours.values()) == 12_821_012_544


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture
def diffusers_dir(tmp_path, params):
  hunyuan.save_diffusers_transformer(CFG, params, tmp_path / "transformer")
  return tmp_path / "transformer"


@pytest.mark.parametrize("scan_layers,max_shard_size", [(True, 10 * 2**30), (False, 20_000)],
                         ids=["scan_single_file", "loop_sharded"])
def test_diffusers_round_trip(tmp_path, params, scan_layers, max_shard_size):
  hunyuan.save_diffusers_transformer(CFG, params, tmp_path / "t", max_shard_size=max_shard_size)
  sharded = (tmp_path / "t" / convert.INDEX_NAME).exists()
  assert sharded == (max_shard_size == 20_000)
  config, loaded = hunyuan.load_diffusers_transformer(tmp_path / "t", scan_layers=scan_layers)
  assert config == CFG.__class__(**{**CFG.to_dict(), "scan_layers": scan_layers})
  chex.assert_trees_all_equal(hunyuan.to_loop_layout(loaded, config),
                              hunyuan.to_loop_layout(params, CFG))


def test_param_dtype_override_casts_on_read(diffusers_dir):
  config, loaded = hunyuan.load_diffusers_transformer(diffusers_dir, param_dtype="bfloat16")
  assert {str(a.dtype) for a in jax.tree.leaves(loaded)} == {"bfloat16"}


def test_patch_embedding_equals_conv3d(diffusers_dir, params):
  weight = load_file(diffusers_dir / WEIGHTS)["x_embedder.proj.weight"]
  assert weight.shape == (CFG.dim, CFG.in_channels, 1, 2, 2)
  x = np.random.default_rng(0).standard_normal((1, CFG.in_channels, 2, 4, 6)).astype(np.float32)
  conv = torch.nn.functional.conv3d(torch.from_numpy(x), torch.from_numpy(weight), stride=(1, 2, 2))
  expected = conv.flatten(2).transpose(1, 2).numpy()  # diffusers' token order
  tokens = hunyuan.transformer.patchify(x, CFG.patch) @ np.asarray(params["x_embedder"]["proj"]["kernel"])
  np.testing.assert_allclose(tokens, expected, atol=1e-5)


def test_pipeline_folder_resolves_transformer_subfolder(diffusers_dir):
  config, _ = hunyuan.load_diffusers_transformer(diffusers_dir.parent)
  assert config.num_layers == CFG.num_layers


def test_unknown_config_key_raises(diffusers_dir):
  raw = json.loads((diffusers_dir / "config.json").read_text())
  (diffusers_dir / "config.json").write_text(json.dumps({**raw, "sliding_window": 4}))
  with pytest.raises(ValueError, match="sliding_window"):
    hunyuan.load_diffusers_transformer(diffusers_dir)


def test_config_disagreeing_with_weights_names_the_tensor(diffusers_dir):
  raw = json.loads((diffusers_dir / "config.json").read_text())
  (diffusers_dir / "config.json").write_text(json.dumps({**raw, "mlp_ratio": 3.0}))
  # int(32 * 3.0) = 96 MLP channels where the weights have 64: the first such tensor.
  with pytest.raises(ValueError, match=r"tensor '[a-z_.0-9]*(proj_mlp|ff\.net\.0\.proj)\.[a-z]+'"
                                       r" in .*safetensors: expected shape \(96,"):
    hunyuan.load_diffusers_transformer(diffusers_dir)


def test_missing_and_unexpected_tensors_are_named(diffusers_dir):
  tensors = load_file(diffusers_dir / WEIGHTS)
  tensors.pop("single_transformer_blocks.0.attn.norm_k.weight")
  tensors["transformer_blocks.0.attn.norm_added_v.weight"] = np.ones((16,), np.float32)
  save_file(tensors, diffusers_dir / WEIGHTS)
  with pytest.raises(ValueError, match=r"missing \(1\): single_transformer_blocks\.0\.attn\."
                                       r"norm_k\.weight(.|\n)*unexpected \(1\): "
                                       r"transformer_blocks\.0\.attn\.norm_added_v\.weight"):
    hunyuan.load_diffusers_transformer(diffusers_dir)


def test_layer_count_mismatch_reports_missing_layer(diffusers_dir):
  raw = json.loads((diffusers_dir / "config.json").read_text())
  (diffusers_dir / "config.json").write_text(json.dumps({**raw, "num_single_layers": 2}))
  with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\."):
    hunyuan.load_diffusers_transformer(diffusers_dir)


@pytest.mark.parametrize("remove", ["config.json", WEIGHTS])
def test_missing_files_raise_file_not_found(diffusers_dir, remove):
  (diffusers_dir / remove).unlink()
  with pytest.raises(FileNotFoundError, match=remove.split(".")[0]):
    hunyuan.load_diffusers_transformer(diffusers_dir)


def test_save_rejects_params_of_another_config(tmp_path, params):
  with pytest.raises(ValueError, match="expected a leading layer axis of 2"):
    hunyuan.save_diffusers_transformer(HunyuanVideoConfig.tiny(num_layers=2), params, tmp_path)
  with pytest.raises(ValueError, match=r"tensor 'time_text_embed\.text_embedder\.linear_1\."
                                       r"kernel'"):
    hunyuan.save_diffusers_transformer(HunyuanVideoConfig.tiny(pooled_dim=8), params, tmp_path)
