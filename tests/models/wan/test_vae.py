"""The Wan2.1 video VAE: parity with a seeded diffusers AutoencoderKLWan (decode,
encode, f32 and bf16), the scan against a Python chunk loop and its trace count,
the full-size weight mapping, the latent (de)normalization, the memory estimate
against XLA, save/load round trips and errors."""

import dataclasses
import functools
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from models import convert_common
from models import wan
from models.wan import WanVAEConfig, vae, vae_convert
from tests.models.helpers import random_like

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# A tiny diffusers VAE with the real structure: 4 stages, two temporal halvings
# (so upsample3d / downsample3d with their time convs), upsample2d/downsample2d,
# attention mid blocks, width-changing resnets; decoder wider than the encoder.
# One resnet per stage (two per decoder stage) keeps CPU compiles short; the slow
# test repeats parity with Wan2.1's num_res_blocks=2.
REF_KWARGS = dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 4, 4],
                  num_res_blocks=1, temperal_downsample=[False, True, True],
                  latents_mean=[0.3, -0.1, 0.2, -0.5], latents_std=[1.7, 0.6, 2.2, 1.1])
BATCH, LATENT_HW = 2, (3, 5)  # non-square: video 24 x 40
VIDEO_HW = (24, 40)
F32_ATOL = 2e-5
# bf16 compute (bf16 params and activations, f32 norms and softmax) against f32:
# the decoded video and the encoded mean stay within this (outputs are O(1)).
BF16_ATOL = 0.1
# LLVM optimizations off: the same XLA program, compiled ~3x faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _seeded_reference(**changes):
  from diffusers import AutoencoderKLWan

  torch.manual_seed(0)
  model = AutoencoderKLWan(**{**REF_KWARGS, **changes}).eval()
  with torch.no_grad():  # norms and biases away from their trivial init
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(diffusers model, its save_pretrained folder, our (config, params) from it)."""
  model = _seeded_reference()
  folder = tmp_path_factory.mktemp("vae") / "vae"
  model.save_pretrained(folder)
  return model, folder, wan.load_diffusers_vae(folder)


@functools.lru_cache(maxsize=None)
def _jitted(fn, config):
  return jax.jit(functools.partial(fn, config), compiler_options=FAST_COMPILE)


def _random_params(config, seed=0):
  return random_like(vae.param_shapes(config), seed, scale=0.2)


def _latents(t, seed=1, batch=BATCH, hw=LATENT_HW, z_dim=4):
  return np.random.default_rng(seed).standard_normal((batch, z_dim, t, *hw)).astype(np.float32)


def _video(frames, seed=2):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (BATCH, 3, frames, *VIDEO_HW)).astype(np.float32)


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("t", [1, 2, 3], ids=lambda t: f"{t=}")
def test_decode_matches_diffusers(reference, t, record_property):
  model, _, (config, params) = reference
  z = _latents(t)
  with torch.no_grad():
    expected = model.decode(torch.from_numpy(z)).sample.numpy()
  out = _jitted(wan.decode, config)(params, z)
  assert out.dtype == jnp.float32
  chex.assert_shape(out, (BATCH, 3, 1 + 4 * (t - 1), *VIDEO_HW))
  assert expected.shape == out.shape
  err = _max_err(out, expected)
  record_property("max_abs_error", err)
  print(f"\ndecode T={t}: max |ours - diffusers| = {err:.3g}")
  # the check would pass on saturated outputs alone: make sure most are not.
  assert np.mean(np.abs(expected) < 0.99) > 0.5
  chex.assert_trees_all_close(out, expected, atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("frames", [1, 5, 9], ids=lambda f: f"{f=}")
def test_encode_matches_diffusers(reference, frames, record_property):
  model, _, (config, params) = reference
  x = _video(frames)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x)).latent_dist
  mean, logvar = _jitted(wan.encode, config)(params, x)
  chex.assert_shape([mean, logvar], (BATCH, 4, 1 + (frames - 1) // 4, *LATENT_HW))
  err_mean, err_logvar = _max_err(mean, dist.mean), _max_err(logvar, dist.logvar)
  record_property("max_abs_error", max(err_mean, err_logvar))
  print(f"\nencode F={frames}: max err mean {err_mean:.3g}, logvar {err_logvar:.3g}")
  chex.assert_trees_all_close(mean, dist.mean.numpy(), atol=F32_ATOL, rtol=0)
  chex.assert_trees_all_close(logvar, dist.logvar.numpy(), atol=F32_ATOL, rtol=0)


@pytest.mark.slow
def test_parity_with_two_res_blocks(tmp_path):
  model = _seeded_reference(num_res_blocks=2)
  model.save_pretrained(tmp_path)
  config, params = wan.load_diffusers_vae(tmp_path)
  assert config.num_res_blocks == 2
  z, x = _latents(3), _video(9)
  with torch.no_grad():
    expected = model.decode(torch.from_numpy(z)).sample.numpy()
    dist = model.encode(torch.from_numpy(x)).latent_dist
  chex.assert_trees_all_close(_jitted(wan.decode, config)(params, z), expected, atol=F32_ATOL,
                              rtol=0)
  mean, logvar = _jitted(wan.encode, config)(params, x)
  chex.assert_trees_all_close(mean, dist.mean.numpy(), atol=F32_ATOL, rtol=0)
  chex.assert_trees_all_close(logvar, dist.logvar.numpy(), atol=F32_ATOL, rtol=0)


@pytest.fixture(scope="module")
def reference_bf16(reference):
  _, folder, _ = reference
  config, params = wan.load_diffusers_vae(folder, dtype="bfloat16", param_dtype="bfloat16")
  assert config.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  return config, params


def test_bf16_decode_close_to_f32(reference, reference_bf16, record_property):
  _, _, (config, params) = reference
  z = _latents(2)
  out32 = _jitted(wan.decode, config)(params, z)
  out16 = _jitted(wan.decode, reference_bf16[0])(reference_bf16[1], z)
  assert out16.dtype == jnp.float32
  err = _max_err(out16, out32)
  record_property("max_abs_error", err)
  print(f"\nbf16 vs f32 decode T=2: max err {err:.3g}")
  assert 0 < err < BF16_ATOL  # (0 would mean bf16 was not used)


@pytest.mark.slow
def test_bf16_encode_close_to_f32(reference, reference_bf16, record_property):
  _, _, (config, params) = reference
  x = _video(5)
  mean32, logvar32 = _jitted(wan.encode, config)(params, x)
  mean16, logvar16 = _jitted(wan.encode, reference_bf16[0])(reference_bf16[1], x)
  errs = _max_err(mean16, mean32), _max_err(logvar16, logvar32)
  record_property("max_abs_error", max(errs))
  print(f"\nbf16 vs f32 encode F=5: max err mean {errs[0]:.3g}, logvar {errs[1]:.3g}")
  assert 0 < errs[0] < BF16_ATOL and 0 < errs[1] < BF16_ATOL


# ------------------------------------------------------- scan and tracing

def _python_loop_decode(config, params, z):
  """decode with the same chunk function, driven by a Python loop (no scan)."""
  x = jnp.transpose(jnp.asarray(z), (0, 2, 3, 4, 1))
  x = vae._pointwise(config, config.z_dim, None).apply({"params": params["post_quant_conv"]}, x)
  cache = vae._zero_cache(vae._decoder_chunk, config, params["decoder"],
                          (x.shape[0], 1, *x.shape[2:]))
  chunks = []
  for i in range(x.shape[1]):
    y, cache = vae._decoder_chunk(config, params["decoder"], cache, x[:, i:i + 1],
                                  first=i == 0)
    chunks.append(y)
  video = jnp.clip(jnp.concatenate(chunks, axis=1), -1, 1)
  return jnp.transpose(video, (0, 4, 1, 2, 3))


def test_scan_equals_python_chunk_loop(reference):
  _, _, (config, params) = reference
  z = _latents(3, seed=3)  # three chunks: the first, then two scan steps
  loop = jax.jit(functools.partial(_python_loop_decode, config), compiler_options=FAST_COMPILE)
  # (the unrolled loop fuses differently: float32 rounding apart)
  chex.assert_trees_all_close(_jitted(wan.decode, config)(params, z), loop(params, z),
                              atol=1e-5, rtol=0)


def test_decoder_traced_once_for_any_length(reference, monkeypatch):
  _, _, (config, params) = reference
  traced = []
  body = vae._decoder_chunk_body

  def counted(config, params, cache, x, first):
    traced.append(first)
    return body(config, params, cache, x, first)

  monkeypatch.setattr(vae, "_decoder_chunk_body", chex.assert_max_traces(counted, n=3))
  hw = (2, 7)  # a shape no other test decodes, so no earlier trace is cached
  decode = jax.jit(functools.partial(wan.decode, config))
  texts = []
  for t in (2, 6):  # lowering traces; compiling would add nothing to what is counted
    z = jax.ShapeDtypeStruct((1, 4, t, *hw), jnp.float32)
    chex.assert_shape(jax.eval_shape(decode, params, z), (1, 3, 1 + 4 * (t - 1), 16, 56))
    texts.append(decode.lower(params, z).as_text())
  # for both lengths together: one trace that sizes the cache (no cache yet), one
  # of the first chunk, one of the later chunks
  assert sorted(traced) == [False, False, True]
  # and no unrolling: the program holds the same convolutions for both lengths
  n_convs = [text.count("stablehlo.convolution") for text in texts]
  assert n_convs[0] == n_convs[1] > 0


# ------------------------------------------------------------- mapping

def test_full_size_mapping_matches_diffusers_state_dict():
  from diffusers import AutoencoderKLWan

  config = WanVAEConfig.wan2_1()
  with torch.device("meta"):
    model = AutoencoderKLWan(**config.to_diffusers_config())
  theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
  shapes = traverse_util.flatten_dict(vae.param_shapes(config))
  ours = {convert_common.indexed_module_name(p): vae_convert._diffusers_shape(p, s.shape)
          for p, s in shapes.items()}
  assert len(ours) == len(shapes)  # the rename is one-to-one
  assert ours == theirs


def test_wan2_1_preset_is_diffusers_default():
  import inspect
  from diffusers import AutoencoderKLWan

  defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters
              .items() if p.default is not inspect.Parameter.empty}
  ours = WanVAEConfig.wan2_1().to_diffusers_config()
  assert ours.keys() == defaults.keys()
  for key, value in defaults.items():
    if key == "decoder_base_dim":
      assert ours[key] is None and value is None
    elif key in ("latents_mean", "latents_std"):
      np.testing.assert_allclose(ours[key], value, rtol=0, atol=0, err_msg=key)
    else:
      assert ours[key] == value, key


# ------------------------------------------------------------- latents

def test_normalize_matches_diffusers_pipelines():
  config = WanVAEConfig.tiny()
  z = _latents(3, seed=5)
  mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
  inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
  # WanPipeline.__call__ before vae.decode; WanVideoToVideoPipeline after vae.encode.
  decode_side = (torch.from_numpy(z) / inv_std + mean).numpy()
  encode_side = ((torch.from_numpy(z) - mean) * inv_std).numpy()
  chex.assert_trees_all_close(wan.denormalize_latents(config, z), decode_side, atol=1e-6,
                              rtol=1e-6)
  chex.assert_trees_all_close(wan.normalize_latents(config, z), encode_side, atol=1e-6,
                              rtol=1e-6)
  assert _max_err(wan.denormalize_latents(config, z), z) > 0.1
  chex.assert_trees_all_close(wan.normalize_latents(config, wan.denormalize_latents(config, z)),
                              z, atol=1e-5)


# ------------------------------------------------------------- memory

@pytest.mark.parametrize("latent_shape", [(1, 4, 3, 16, 16), (2, 4, 4, 8, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_decode_memory_estimate_vs_xla(latent_shape, record_property):
  config = WanVAEConfig.tiny()
  shapes = vae.param_shapes(config)
  params = {k: shapes[k] for k in ("post_quant_conv", "decoder")}
  z = jax.ShapeDtypeStruct(latent_shape, jnp.float32)
  # (buffer assignment is the same at any LLVM optimization level)
  stats = jax.jit(functools.partial(wan.decode, config), compiler_options=FAST_COMPILE) \
      .lower(params, z).compile().memory_analysis()
  if stats is None:
    pytest.skip("this backend reports no memory analysis")
  measured = (stats.argument_size_in_bytes + stats.output_size_in_bytes
              + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  estimate = wan.decode_memory_bytes(config, latent_shape)
  record_property("estimate_over_measured", estimate / measured)
  print(f"\n{latent_shape}: estimate {estimate} B, XLA {measured} B, "
        f"ratio {estimate / measured:.3f}")
  assert 0.8 <= estimate / measured <= 1.25


def test_decode_memory_terms():
  config = WanVAEConfig.wan2_1()
  small = vae.decode_memory_terms(config, (1, 16, 21, 60, 104))
  big = vae.decode_memory_terms(config, (1, 16, 21, 90, 160))
  # params do not depend on the size; cache, video and activations scale with pixels
  assert small["params"] == big["params"] > 0
  pixels = (90 * 160) / (60 * 104)
  for key in ("cache", "video"):
    assert big[key] == pytest.approx(pixels * small[key], rel=1e-6), key
  assert big["video"] == 81 * 3 * 720 * 1280 * 4
  # bf16 halves every activation-sized term but the float32 video
  half = vae.decode_memory_terms(config, (1, 16, 21, 90, 160), dtype="bfloat16")
  assert half["cache"] * 2 == big["cache"] and half["video"] == big["video"]
  assert wan.decode_memory_bytes(config, (1, 16, 21, 90, 160)) == sum(
      v for k, v in big.items() if k != "peak_op")
  with pytest.raises(ValueError, match="z_dim = 16"):
    wan.decode_memory_bytes(config, (1, 4, 21, 90, 160))


# ------------------------------------------------------------ round trips

def test_save_round_trip_through_diffusers(reference, tmp_path):
  model, folder, (config, params) = reference
  wan.save_diffusers_vae(config, params, tmp_path / "ours")
  bookkeeping = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
  from diffusers import AutoencoderKLWan
  ours_config = AutoencoderKLWan.load_config(tmp_path / "ours")
  assert bookkeeping(ours_config) == bookkeeping(AutoencoderKLWan.load_config(folder))
  reread = AutoencoderKLWan.from_pretrained(tmp_path / "ours")
  ref_state, our_state = model.state_dict(), reread.state_dict()
  assert ref_state.keys() == our_state.keys()
  for name in ref_state:
    np.testing.assert_array_equal(our_state[name].numpy(), ref_state[name].numpy(), err_msg=name)


def test_sharded_round_trip_and_pipeline_folder(reference, tmp_path):
  _, _, (config, params) = reference
  wan.save_diffusers_vae(config, params, tmp_path / "vae", max_shard_size=64 * 1024)
  assert len(list((tmp_path / "vae").glob("*.safetensors"))) > 1
  assert (tmp_path / "vae" / vae_convert.INDEX_NAME).exists()
  config2, params2 = wan.load_diffusers_vae(tmp_path)  # a pipeline folder: finds vae/
  assert config2 == config
  chex.assert_trees_all_equal(params2, params)


# ------------------------------------------------------------------ errors

def _write_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def tiny_folder(tmp_path):
  config = WanVAEConfig.tiny()
  wan.save_diffusers_vae(config, _random_params(config), tmp_path)
  return tmp_path


def test_diffusers_config_accepts_every_key_diffusers_writes(reference):
  _, folder, (config, _) = reference
  written = json.loads((folder / "config.json").read_text())
  assert set(vae._DIFFUSERS_DEFAULTS) == {k for k in written if not k.startswith("_")}
  assert config.decoder_base_dim == 12 and config.base_dim == 8
  assert config.latents_std == tuple(REF_KWARGS["latents_std"])


@pytest.mark.parametrize("changes, match", [
    ({"not_a_key": 1}, "unknown config key 'not_a_key'"),
    ({"is_residual": True}, "'is_residual'=True .*only False"),
    ({"patch_size": 2}, "'patch_size'=2 .*only None"),
    ({"attn_scales": [0.5]}, "'attn_scales'.*only \\[\\]"),
    ({"scale_factor_spatial": 16}, "'scale_factor_spatial'=16 does not match.*8"),
    ({"_class_name": "AutoencoderKL"}, "_class_name must be one of"),
    ({"temperal_downsample": [True, True, True]}, "exactly twice"),
], ids=["unknown_key", "is_residual", "patch_size", "attn_scales", "scale_factor",
        "class_name", "temporal_downsample"])
def test_config_errors(tiny_folder, changes, match):
  _write_config(tiny_folder, **changes)
  with pytest.raises(ValueError, match=match):
    wan.load_diffusers_vae(tiny_folder)


def test_missing_files(tiny_folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    wan.load_diffusers_vae(tmp_path / "nowhere")
  (tiny_folder / vae_convert.WEIGHTS_NAME).unlink()
  with pytest.raises(FileNotFoundError, match=vae_convert.WEIGHTS_NAME):
    wan.load_diffusers_vae(tiny_folder)
  (tiny_folder / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    wan.load_diffusers_vae(tiny_folder)


def test_wrong_shape_and_missing_tensor_name_the_tensor(tiny_folder):
  file = tiny_folder / vae_convert.WEIGHTS_NAME
  tensors = load_file(file)
  name = "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
  good = tensors[name]
  tensors[name] = good[:, :-1]
  save_file(tensors, file)
  with pytest.raises(ValueError, match=re.escape(f"'{name}'") + ".*expected shape "
                     + re.escape(str(tuple(good.shape)))):
    wan.load_diffusers_vae(tiny_folder)
  del tensors[name]
  save_file(tensors, file)
  with pytest.raises(ValueError, match=f"missing \\(1\\): {name}"):
    wan.load_diffusers_vae(tiny_folder)


def test_input_errors():
  config = WanVAEConfig.tiny()
  params = vae.param_shapes(config)
  encode = functools.partial(jax.eval_shape, functools.partial(wan.encode, config), params)
  decode = functools.partial(jax.eval_shape, functools.partial(wan.decode, config), params)
  video = lambda c, f, h=16, w=24: jax.ShapeDtypeStruct((1, c, f, h, w), jnp.float32)
  chex.assert_shape(encode(video(3, 9)), (1, 4, 3, 2, 3))  # the good case works
  for frames in (2, 4, 8):
    with pytest.raises(ValueError, match=f"4k \\+ 1 .*got {frames}"):
      encode(video(3, frames))
  with pytest.raises(ValueError, match="in_channels = 3 channels"):
    encode(video(4, 5))
  with pytest.raises(ValueError, match="multiples of 8, got 12x24"):
    encode(video(3, 5, h=12))
  with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
    encode(jax.ShapeDtypeStruct((3, 5, 16, 24), jnp.float32))
  with pytest.raises(ValueError, match="z_dim = 4 channels"):
    decode(jax.ShapeDtypeStruct((1, 16, 2, 2, 3), jnp.float32))
  with pytest.raises(ValueError, match="z_dim = 4 channels"):
    wan.denormalize_latents(config, np.zeros((1, 16, 2, 2, 3), np.float32))


@pytest.mark.parametrize("changes, match", [
    (dict(dim_mult=(1, 2)), "at least 3 stages"),
    (dict(temporal_downsample=(False, True)), "len\\(dim_mult\\) - 1 = 3"),
    (dict(latents_mean=(0.0,) * 3), "z_dim = 4 entries"),
    (dict(latents_std=(1.0, 1.0, 0.0, 1.0)), "latents_std must be > 0"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(base_dim=0), "base_dim must be a positive int"),
], ids=["dim_mult", "temporal_downsample", "latents_mean", "latents_std", "dtype", "base_dim"])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    WanVAEConfig.tiny(**changes)


def test_config_shapes_and_hashable():
  config = WanVAEConfig.wan2_1()
  assert config.latent_shape(1, 81, 720, 1280) == (1, 16, 21, 90, 160)
  assert config.video_shape(1, 21, 60, 104) == (1, 3, 81, 480, 832)
  assert hash(config) == hash(WanVAEConfig.wan2_1())
  assert dataclasses.replace(config, dtype="bfloat16").dtype == jnp.bfloat16
