"""Loading the CogVideoX VAE decoder from a diffusers `AutoencoderKLCogVideoX` folder.

A diffusers vae/ folder holds config.json plus diffusion_pytorch_model.safetensors
(or shards listed in diffusion_pytorch_model.safetensors.index.json). Our
modules keep diffusers' names (see models.cogvideox.vae), so the mapping is:

  a list index    name_i                        <-> name.i
  Conv3d weight   kernel [kt, kh, kw, in, out]  <-> weight [out, in, kt, kh, kw]
  Conv2d weight   kernel [kh, kw, in, out]      <-> weight [out, in, kh, kw]
  other leaves    (GroupNorm weight, biases)    unchanged

The decoder is read, and the encoder only when asked (else `encoder.*` tensors
are skipped). Every name and shape is checked before any tensor is read; each
tensor is cast to param_dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models import weights
from models.cogvideox import vae_encoder
from models.convert_common import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, indexed_module_name
from models.cogvideox.vae import CogVideoXVAEConfig, param_shapes
from models.weights import check_names, check_shape, open_tensors, parse_config, read_json, \
    weight_files


# diffusers 0.42.1 AutoencoderKLCogVideoX.__init__ arguments and their defaults
# (every key its save_pretrained writes, besides the "_" bookkeeping ones).
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "block_out_channels": [128, 256, 256, 512],
    "latent_channels": 16,
    "layers_per_block": 3,
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "sample_height": 480,
    "sample_width": 720,
    "scaling_factor": 1.15258426,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "invert_scale_latents": False,
}
_DIFFUSERS_CLASS = "AutoencoderKLCogVideoX"
# Only diffusers' tiling (off by default) and its fp16 advice read these.
_IGNORED = ("sample_height", "sample_width", "force_upcast")
# Keys that would change the math if set; every released CogVideoX VAE has this value.
_REQUIRED = {"act_fn": ("silu", "swish"), "shift_factor": (None,), "latents_mean": (None,),
             "latents_std": (None,), "use_quant_conv": (False,), "use_post_quant_conv": (False,)}

_ParamPath = tuple[str, ...]


def config_from_diffusers(raw: Mapping[str, Any], **overrides) -> CogVideoXVAEConfig:
  """Our config from an `AutoencoderKLCogVideoX` config.json dict; overrides set
  our own fields (dtype, param_dtype). Unknown keys and unsupported values fail
  naming the key."""
  where = "diffusers CogVideoX VAE config"
  cfg = parse_config(raw, _DIFFUSERS_DEFAULTS, where=where, class_names=(_DIFFUSERS_CLASS,),
                     ignored=_IGNORED)
  for key, allowed in _REQUIRED.items():
    if cfg[key] not in allowed:
      raise ValueError(f"{where}: key {key!r}={cfg[key]!r} is not supported; only "
                       f"{' or '.join(map(repr, allowed))}")
  n = len(cfg["block_out_channels"])
  for key, block in (("down_block_types", "CogVideoXDownBlock3D"),
                     ("up_block_types", "CogVideoXUpBlock3D")):
    if list(cfg[key]) != [block] * n:
      raise ValueError(f"{where}: key {key!r} must be {n} x {block!r} (one per "
                       f"block_out_channels entry), got {cfg[key]!r}")
  ratio = cfg["temporal_compression_ratio"]
  if isinstance(ratio, float) and ratio.is_integer():
    ratio = int(ratio)
  return CogVideoXVAEConfig(
      in_channels=cfg["in_channels"],
      out_channels=cfg["out_channels"],
      latent_channels=cfg["latent_channels"],
      block_out_channels=tuple(cfg["block_out_channels"]),
      layers_per_block=cfg["layers_per_block"],
      norm_num_groups=cfg["norm_num_groups"],
      norm_eps=cfg["norm_eps"],
      temporal_compression_ratio=ratio,
      scaling_factor=cfg["scaling_factor"],
      invert_scale_latents=cfg["invert_scale_latents"],
      **overrides,
  )


def _diffusers_shape(path: _ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":  # [..spatial.., in, out] -> [out, in, ..spatial..]
    return (shape[-1], shape[-2], *shape[:-2])
  return tuple(shape)


def _from_diffusers(path: _ParamPath, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return array.transpose(*range(2, array.ndim), 1, 0)
  return array


def load_diffusers_vae(folder, *, encoder: bool = False,
                       **overrides) -> tuple[CogVideoXVAEConfig, Any]:
  """Reads a diffusers `AutoencoderKLCogVideoX` folder (or a pipeline folder with a
  vae/ subfolder). overrides set our own config fields (dtype, param_dtype).
  Returns (config, params), params {"decoder": ...} (plus "encoder" when
  encoder=True) in config.param_dtype."""
  folder = weights.model_dir(folder, "vae", "diffusers VAE")
  config = config_from_diffusers(read_json(folder / CONFIG_NAME), **overrides)
  tree = dict(param_shapes(config))
  if encoder:
    tree.update(vae_encoder.param_shapes(config))
  shapes = traverse_util.flatten_dict(tree)
  names = {indexed_module_name(p): p for p in shapes}
  files = weight_files(folder, WEIGHTS_NAME, INDEX_NAME)
  if not encoder:
    files = {n: f for n, f in files.items() if not n.startswith("encoder.")}
  check_names(names, files, str(folder))

  flat = {}
  with open_tensors(files) as tensors:
    for name, p in names.items():  # every shape first: fail before reading any data
      check_shape(name, _diffusers_shape(p, shapes[p].shape), tensors.shape(name),
                  tensors.where(name))
    for name, p in names.items():
      array = _from_diffusers(p, tensors.get(name)).astype(shapes[p].dtype, copy=False)
      flat[p] = jnp.asarray(array)
  return config, traverse_util.unflatten_dict(flat)
