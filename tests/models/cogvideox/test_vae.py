"""The CogVideoX VAE: parity of the decoder and the encoder with a seeded diffusers
AutoencoderKLCogVideoX (float32 for several frame counts, float64 exactness,
bfloat16 closeness), the frame counts, and the loader's errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from models import convert_common
from models.cogvideox import vae, vae_convert, vae_encoder

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# The real structure (4 blocks; the first two up blocks double time, the third
# only space; a width-changing resnet) at 8-16 channels, one resnet per encoder
# block (two per up block).
REF_KWARGS = dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                  norm_num_groups=4, temporal_compression_ratio=4)
BATCH, LATENT_HW, VIDEO_HW = 2, (2, 3), (16, 24)  # non-square
# float32: max |ours - diffusers| measured 7e-7..6e-6 on outputs of size ~1-2
# (float64 agrees to 1.4e-14: the float32 gap is rounding).
F32_ATOL = 2e-5
F64_ATOL = 1e-10
BF16_ATOL = 0.2  # bf16 params and convs (f32 norms) against f32: measured 0.05
# LLVM optimizations off: the same XLA program, compiled ~3x faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _seeded_reference():
  from diffusers import AutoencoderKLCogVideoX

  torch.manual_seed(0)
  model = AutoencoderKLCogVideoX(**REF_KWARGS).eval()
  with torch.no_grad():  # norms and biases away from their trivial init
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
    for p in model.decoder.conv_out.parameters():  # outputs of size ~1, as a trained VAE's
      p.mul_(0.1)
  return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(diffusers model, its save_pretrained folder, our (config, params) from it)."""
  model = _seeded_reference()
  folder = tmp_path_factory.mktemp("vae") / "vae"
  model.save_pretrained(folder)
  return model, folder, vae_convert.load_diffusers_vae(folder)


@pytest.fixture(scope="module")
def encoder_params(reference):
  """Our (config, params) with the encoder too."""
  _, folder, _ = reference
  return vae_convert.load_diffusers_vae(folder, encoder=True)


@functools.lru_cache(maxsize=None)
def _jitted(config, fn=vae.decode):
  return jax.jit(functools.partial(fn, config), compiler_options=FAST_COMPILE)


def _video(frames, seed=2):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (BATCH, 3, frames, *VIDEO_HW)).astype(np.float32)


def _latents(frames, seed=1):
  shape = (BATCH, REF_KWARGS["latent_channels"], frames, *LATENT_HW)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------ parity

# 1: one frame alone; 3: one odd chunk of 3 (its first frame apart in the norms
# and the time upsampling); 4: two chunks of 2 (the cache carried through the
# scan); 5: an odd first chunk of 3, then a chunk of 2.
@pytest.mark.parametrize("frames", [1, 3, 4, 5], ids=lambda f: f"F={f}")
def test_decode_matches_diffusers(reference, frames, record_property):
  model, _, (config, params) = reference
  z = _latents(frames)
  with torch.no_grad():
    expected = model.decode(torch.from_numpy(z)).sample.numpy()
  out = _jitted(config)(params, z)
  assert out.dtype == jnp.float32
  assert out.shape == expected.shape == vae.video_shape(config, z.shape)
  err = _max_err(out, expected)
  record_property("max_abs_error", err)
  print(f"\ndecode F={frames}: max |ours - diffusers| = {err:.3g} "
        f"(max |video| {np.abs(expected).max():.3g})")
  assert np.mean(np.abs(expected) < 1) > 0.3  # mostly in the video range
  np.testing.assert_allclose(out, expected, atol=F32_ATOL, rtol=0)


@pytest.mark.slow  # ~13 s of compiling on CPU
def test_decode_float64_is_exact(reference, record_property):
  model, folder, _ = reference
  z = _latents(5, seed=2).astype(np.float64)
  with torch.no_grad():
    expected = model.double().decode(torch.from_numpy(z)).sample.numpy()
  model.float()
  with jax.enable_x64(True):
    config, params = vae_convert.load_diffusers_vae(folder, dtype="float64",
                                                    param_dtype="float64")
    out = np.asarray(jax.jit(functools.partial(vae.decode, config),
                             compiler_options=FAST_COMPILE)(params, z))
  assert out.dtype == np.float64
  err = _max_err(out, expected)
  record_property("max_abs_error", err)
  print(f"\ndecode float64 F=5: max |ours - diffusers| = {err:.3g}")
  np.testing.assert_allclose(out, expected, atol=F64_ATOL, rtol=0)


# 1: one frame; 5: one odd chunk (5 -> 3 -> 2 frames: odd, then even pooling);
# 17: a first chunk of 9, then one of 8 through the scan.
@pytest.mark.parametrize("frames", [1, 5, 17], ids=lambda f: f"F={f}")
def test_encode_matches_diffusers(reference, encoder_params, frames, record_property):
  model, _, _ = reference
  config, params = encoder_params
  x = _video(frames)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x)).latent_dist
  mean, logvar = _jitted(config, vae_encoder.encode)(params, x)
  assert mean.dtype == logvar.dtype == jnp.float32
  assert mean.shape == logvar.shape == tuple(dist.mean.shape)
  assert mean.shape[2] == vae_encoder.latent_frames(config, frames)
  errs = _max_err(mean, dist.mean), _max_err(logvar, dist.logvar)
  record_property("max_abs_error", max(errs))
  print(f"\nencode F={frames}: max err mean {errs[0]:.3g}, logvar {errs[1]:.3g}")
  np.testing.assert_allclose(mean, dist.mean.numpy(), atol=F32_ATOL, rtol=0)
  np.testing.assert_allclose(logvar, dist.logvar.numpy(), atol=F32_ATOL, rtol=0)


@pytest.mark.slow  # ~10 s of compiling on CPU
def test_encode_float64_is_exact(reference, record_property):
  model, folder, _ = reference
  x = _video(17, seed=3).astype(np.float64)
  with torch.no_grad():
    dist = model.double().encode(torch.from_numpy(x)).latent_dist
  model.float()
  with jax.enable_x64(True):
    config, params = vae_convert.load_diffusers_vae(folder, encoder=True, dtype="float64",
                                                    param_dtype="float64")
    mean, logvar = jax.jit(functools.partial(vae_encoder.encode, config),
                           compiler_options=FAST_COMPILE)(params, x)
  assert mean.dtype == np.float64
  err = max(_max_err(mean, dist.mean), _max_err(logvar, dist.logvar))
  record_property("max_abs_error", err)
  print(f"\nencode float64 F=17: max |ours - diffusers| = {err:.3g}")
  np.testing.assert_allclose(mean, dist.mean.numpy(), atol=F64_ATOL, rtol=0)
  np.testing.assert_allclose(logvar, dist.logvar.numpy(), atol=F64_ATOL, rtol=0)


def test_bf16_decode_close_to_f32(reference, record_property):
  _, folder, (config, params) = reference
  config16, params16 = vae_convert.load_diffusers_vae(folder, dtype="bfloat16",
                                                      param_dtype="bfloat16")
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
  z = _latents(2)  # one chunk: a short compile
  out32, out16 = _jitted(config)(params, z), _jitted(config16)(params16, z)
  assert out16.dtype == jnp.float32
  err = _max_err(out16, out32)
  record_property("max_abs_error", err)
  print(f"\nbf16 vs f32 decode F=2: max err {err:.3g}")
  assert 0 < err < BF16_ATOL  # (0 would mean bf16 was not used)


# ------------------------------------------------------------------ sizes

def test_video_frames():
  cfg = vae.CogVideoXVAEConfig()
  # diffusers' chunks: 13 latent frames -> 3 + 5 x 2 -> 9 + 5 x 8 video frames.
  assert [vae.video_frames(cfg, f) for f in (1, 2, 3, 4, 5, 13)] == [1, 8, 9, 16, 17, 49]
  assert vae.video_shape(cfg, (1, 16, 13, 60, 90)) == (1, 3, 49, 480, 720)
  assert cfg.spatial_factor == 8 and cfg.time_upsampling_blocks == 2
  # diffusers' encoder chunks: 49 frames -> 9 + 5 x 8 -> 3 + 5 x 2 latent frames.
  assert [vae_encoder.latent_frames(cfg, f) for f in (1, 5, 8, 9, 12, 17, 49)] == \
      [1, 2, 2, 3, 3, 5, 13]


def test_decode_input_errors(reference):
  _, _, (config, params) = reference
  with pytest.raises(ValueError, match=r"latents must be \[B, 4, F, h, w\]"):
    vae.decode(config, params, np.zeros((1, 3, 1, 2, 2), np.float32))
  with pytest.raises(ValueError, match="latents must be"):
    vae.decode(config, params, np.zeros((4, 1, 2, 2), np.float32))
  with pytest.raises(ValueError, match=r"video must be \[B, 3, F, H, W\]"):
    vae_encoder.encode(config, params, np.zeros((1, 4, 1, 8, 8), np.float32))


# ------------------------------------------------------------------ loader

def test_config_round_trip_of_every_key_diffusers_writes(reference):
  model, folder, (config, _) = reference
  raw = json.loads((folder / "config.json").read_text())
  assert set(k for k in raw if not k.startswith("_")) == set(vae_convert._DIFFUSERS_DEFAULTS)
  assert config.block_out_channels == (8, 8, 16, 16) and config.latent_channels == 4
  assert config.scaling_factor == pytest.approx(model.config.scaling_factor)
  assert vae.CogVideoXVAEConfig() == vae_convert.config_from_diffusers({})


@pytest.fixture
def vae_folder(reference, tmp_path):
  """A writable copy of the reference folder."""
  _, folder, _ = reference
  copy = tmp_path / "vae"
  copy.mkdir()
  for f in folder.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  return copy


def _edit_config(folder, **changes):
  raw = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**raw, **changes}))


@pytest.mark.parametrize("changes, match", [
    (dict(bogus_key=1), "unknown config key 'bogus_key'"),
    (dict(_class_name="AutoencoderKLWan"), "_class_name must be one of"),
    (dict(use_post_quant_conv=True), "'use_post_quant_conv'=True is not supported"),
    (dict(act_fn="gelu"), "'act_fn'='gelu' is not supported"),
    (dict(up_block_types=["CogVideoXUpBlock3D"] * 3), "'up_block_types' must be 4 x"),
    (dict(temporal_compression_ratio=3), "must be a power of 2"),
    (dict(norm_num_groups=3), "multiples of norm_num_groups = 3"),
], ids=lambda x: str(x)[:30])
def test_config_errors(vae_folder, changes, match):
  _edit_config(vae_folder, **changes)
  with pytest.raises(ValueError, match=match):
    vae_convert.load_diffusers_vae(vae_folder)


def _edit_weights(folder, fn):
  path = folder / vae_convert.WEIGHTS_NAME
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path)


def test_missing_tensor_is_named(vae_folder):
  name = "decoder.up_blocks.1.resnets.0.norm2.conv_y.conv.weight"
  _edit_weights(vae_folder, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=r"missing \(1\): " + name.replace(".", r"\.")):
    vae_convert.load_diffusers_vae(vae_folder)


def test_wrong_shape_and_unexpected_tensor_are_named(vae_folder):
  name = "decoder.conv_in.conv.bias"
  _edit_weights(vae_folder, lambda t: t.update({name: np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=rf"tensor '{name}' .*expected shape \(16,\), got \(3,\)"):
    vae_convert.load_diffusers_vae(vae_folder)
  _edit_weights(vae_folder, lambda t: t.update({name: np.zeros(16, np.float32),
                                                "decoder.extra.weight": np.zeros(1, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected \(1\): decoder\.extra\.weight"):
    vae_convert.load_diffusers_vae(vae_folder)


def test_encoder_tensors_are_not_needed_and_pipeline_folder_works(vae_folder, tmp_path):
  _edit_weights(vae_folder, lambda t: [t.pop(n) for n in list(t) if n.startswith("encoder.")])
  config, params = vae_convert.load_diffusers_vae(tmp_path)  # holds vae/
  assert set(params) == {"decoder"}
  with pytest.raises(ValueError, match=r"missing \(\d+\): encoder\.conv_in\.conv\.bias"):
    vae_convert.load_diffusers_vae(tmp_path, encoder=True)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    vae_convert.load_diffusers_vae(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vae_convert.load_diffusers_vae(tmp_path / "nowhere")


def test_full_size_mapping_matches_diffusers_state_dict():
  """CogVideoX's own VAE (default config, built on the meta device): every tensor
  name and shape is one of ours, and the reverse."""
  from diffusers import AutoencoderKLCogVideoX

  with torch.device("meta"):
    model = AutoencoderKLCogVideoX()
  theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
  config = vae_convert.config_from_diffusers(dict(model.config))
  shapes = traverse_util.flatten_dict({**vae.param_shapes(config),
                                       **vae_encoder.param_shapes(config)})
  ours = {convert_common.indexed_module_name(p): vae_convert._diffusers_shape(p, s.shape)
          for p, s in shapes.items()}
  assert ours == theirs


def test_package_exports():
  from models import cogvideox

  assert cogvideox.decode is vae.decode and cogvideox.video_frames is vae.video_frames
  assert cogvideox.load_diffusers_vae is vae_convert.load_diffusers_vae
  assert cogvideox.CogVideoXVAEConfig is vae.CogVideoXVAEConfig
  assert cogvideox.encode is vae_encoder.encode


def test_full_size_shapes():
  """CogVideoX's 49 frames at 480 x 720 <-> 13 latent frames at 60 x 90 (traced, not run)."""
  config = vae.CogVideoXVAEConfig(dtype="bfloat16", param_dtype="bfloat16")
  params = {**vae.param_shapes(config), **vae_encoder.param_shapes(config)}
  video = jax.eval_shape(functools.partial(vae.decode, config), params,
                         jax.ShapeDtypeStruct((1, 16, 13, 60, 90), jnp.float32))
  assert (video.shape, video.dtype) == ((1, 3, 49, 480, 720), jnp.float32)
  mean, logvar = jax.eval_shape(functools.partial(vae_encoder.encode, config), params,
                                jax.ShapeDtypeStruct((1, 3, 49, 480, 720), jnp.float32))
  assert mean.shape == logvar.shape == (1, 16, 13, 60, 90)
