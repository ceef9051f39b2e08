"""Shared helpers of the model tests: random params, checkpoint edits and the checks
every transformer family runs alike."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from models import cogvideox, hunyuan, wan

_PARAM_SHAPES = {wan.WanConfig: wan.param_shapes, cogvideox.CogVideoXConfig: cogvideox.param_shapes,
                 hunyuan.HunyuanVideoConfig: hunyuan.param_shapes}


def random_like(shapes, seed=0, scale=0.3):
  """Normal arrays of scale `scale` with the shapes and dtypes of a ShapeDtypeStruct tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def random_params(config, seed=0):
  """Fresh normal params of the right shapes (no init compile), in the config's layout."""
  return random_like(_PARAM_SHAPES[type(config)](config), seed)


def edit_config(folder, **changes):
  """Rewrites folder/config.json with `changes`."""
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(folder, weights_name, edit):
  """Rewrites folder/weights_name after edit(tensors) changed its name -> array dict."""
  tensors = load_file(folder / weights_name)
  edit(tensors)
  save_file(tensors, folder / weights_name)


def assert_bfloat16_close(forward_f32, forward_bf16, params, inputs, tolerance=0.05):
  """The bfloat16-compute forward is finite, bfloat16 and within `tolerance` relative
  L2 error of the float32 one."""
  ref, _ = forward_f32(params, *inputs)
  out, _ = forward_bf16(params, *inputs)
  chex.assert_type(out, jnp.bfloat16)
  chex.assert_tree_all_finite(out)
  rel = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
  assert float(rel) < tolerance, float(rel)


def assert_compiles_once(apply, params, inputs):
  """apply(params, latents, timestep, context) traces once for new latents and timesteps."""
  traces = []

  @jax.jit
  def step(p, x, t, c):
    traces.append(None)
    return apply(p, x, t, c)[0]

  latents, timestep, context = inputs
  for i in range(3):
    step(params, latents + i, timestep * 0.5 ** i, context)
  assert len(traces) == 1, f"traced {len(traces)} times"
