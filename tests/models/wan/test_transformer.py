"""WanDiT: patches, layer modes (scan / loop / remat), the attention-control contract,
dtypes and input validation. Parity with diffusers is in test_loading.py."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from models import wan
from models.wan import WanConfig
from models import attention
from tests.models.helpers import assert_bfloat16_close, assert_compiles_once, random_params

CFG = WanConfig.tiny()
B, F, H, W, TEXT_LEN = 2, 2, 4, 6, 5




@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


@pytest.fixture(scope="module")
def inputs():
  # numpy draws: eager jax.random would compile a kernel per call on CPU.
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((B, CFG.in_channels, F, H, W)).astype(np.float32)
  timestep = rng.uniform(0.0, 1000.0, (B,)).astype(np.float32)
  context = rng.standard_normal((B, TEXT_LEN, CFG.text_dim)).astype(np.float32)
  return latents, timestep, context


@functools.cache
def _forward(config):
  """One compiled dense forward per config, shared by the tests."""
  return jax.jit(lambda p, x, t, c, control=None: wan.apply(config, p, x, t, c, control))


@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2), (1, 1, 3)],
                         ids=lambda p: f"patch={'x'.join(map(str, p))}")
def test_patchify_unpatchify_round_trip(patch_size):
  x = np.random.default_rng(0).standard_normal((2, 3, 4, 6, 6))  # numpy: no op compiles
  grid = tuple(n // p for n, p in zip(x.shape[2:], patch_size))
  tokens = wan.patchify(x, patch_size)
  chex.assert_shape(tokens, (2, np.prod(grid), np.prod(patch_size) * 3))
  chex.assert_trees_all_equal(wan.unpatchify(tokens, patch_size, grid), x)
  # Token order is frame-major, then row, then column; a token holds its own patch.
  pt, ph, pw = patch_size
  t, h, w = grid[0] - 1, grid[1] - 1, 0
  patch = x[:, :, t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
  s = (t * grid[1] + h) * grid[2] + w
  chex.assert_trees_all_equal(tokens[:, s], patch.transpose(0, 2, 3, 4, 1).reshape(2, -1))


def test_output_shape_dtype_and_empty_dense_stats(params, inputs):
  out, stats = _forward(CFG)(params, *inputs)
  chex.assert_shape(out, (B, CFG.out_channels, F, H, W))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert stats == {}


def test_init_params_matches_param_shapes():
  config = WanConfig.tiny(num_layers=1)
  params = wan.init_params(config, jax.random.key(0), F, H, W, TEXT_LEN)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, wan.param_shapes(config))
  table = params["blocks"]["scale_shift_table"]
  assert float(jnp.std(table)) > 0.5 * config.dim ** -0.5  # random, as in diffusers


@pytest.mark.parametrize("remat", [False, True], ids=lambda r: f"{r=}")
def test_loop_layers_equal_scanned_layers(params, inputs, remat):
  scanned, _ = _forward(CFG)(params, *inputs)
  loop_cfg = dataclasses.replace(CFG, scan_layers=False, remat=remat)
  loop_params = wan.unstack_blocks(params, CFG.num_layers)
  chex.assert_trees_all_equal_shapes_and_dtypes(loop_params, wan.param_shapes(loop_cfg))
  looped, _ = _forward(loop_cfg)(loop_params, *inputs)
  chex.assert_trees_all_close(looped, scanned, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_remat_scanned_gradients_match(params, inputs):
  def loss(config):
    return lambda p: jnp.mean(wan.apply(config, p, *inputs)[0] ** 2)
  g_plain = jax.jit(jax.grad(loss(CFG)))(params)
  g_remat = jax.jit(jax.grad(loss(dataclasses.replace(CFG, remat=True))))(params)
  chex.assert_trees_all_close(g_remat, g_plain, atol=1e-5, rtol=1e-5)


@struct.dataclass
class _RecordingHook:
  """A minimal `models.attention.AttentionHook`: dense attention, and stats that
  show which slice of the control each layer saw."""
  block_mask: jax.Array

  def self_attention(self, q, k, v):
    out = attention.dense_attention(q, k, v)
    return out, {"mask_sum": self.block_mask.sum(axis=(-2, -1)).astype(jnp.float32),
                 "mask_shape": jnp.asarray(self.block_mask.shape),
                 "q_norm": jnp.linalg.norm(q.astype(jnp.float32))}

  def cross_attention(self, q, k, v):
    return attention.dense_attention(q, k, v)


@pytest.mark.parametrize("scan_layers", [True, False], ids=lambda s: f"{s=}")
def test_control_is_sliced_per_layer_and_stats_stack(params, inputs, scan_layers):
  """Each layer's hook sees its own [B, H, n, n] slice; stats come back [L, ...]."""
  config = dataclasses.replace(CFG, scan_layers=scan_layers)
  p = params if scan_layers else wan.unstack_blocks(params, CFG.num_layers)
  dense, _ = _forward(config)(p, *inputs)
  n = 3
  mask = np.random.default_rng(7).random((CFG.num_layers, B, CFG.num_heads, n, n)) < 0.5
  forward = jax.jit(lambda p, x, t, c, control: wan.apply(config, p, x, t, c, control))
  out, stats = forward(p, *inputs, _RecordingHook(jnp.asarray(mask)))
  chex.assert_trees_all_equal(stats["mask_shape"],
                              np.tile([B, CFG.num_heads, n, n], (CFG.num_layers, 1)))
  chex.assert_shape(stats["mask_sum"], (CFG.num_layers, B, CFG.num_heads))
  chex.assert_shape(stats["q_norm"], (CFG.num_layers,))
  chex.assert_trees_all_equal(stats["mask_sum"], mask.sum(axis=(-2, -1)).astype(np.float32))
  # The hook is dense attention, so the velocity equals the dense model's.
  chex.assert_trees_all_close(out, dense, atol=1e-6, rtol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(params, inputs):
  assert_bfloat16_close(_forward(CFG), _forward(dataclasses.replace(CFG, dtype="bfloat16")),
                        params, inputs)


def test_compiles_once_across_calls(params, inputs):
  assert_compiles_once(lambda p, x, t, c: wan.apply(CFG, p, x, t, c), params, inputs)


def test_scalar_timestep_broadcasts(params, inputs):
  latents, timestep, context = inputs
  t = timestep[0]
  out_scalar, _ = _forward(CFG)(params, latents, t, context)
  out_vector, _ = _forward(CFG)(params, latents, jnp.full((B,), t), context)
  chex.assert_trees_all_close(out_scalar, out_vector)


@pytest.mark.parametrize("latent_shape,t_shape,ctx_shape,match", [
    ((B, 3, F, H, W), (B,), (B, TEXT_LEN, 32), "latents"),
    ((B, 4, F, H, 5), (B,), (B, TEXT_LEN, 32), "width=5"),
    ((B, 4, F, H, W), (B + 1,), (B, TEXT_LEN, 32), "timestep"),
    ((B, 4, F, H, W), (B,), (B, TEXT_LEN, 16), "context"),
], ids=["channels", "odd_width", "timestep_batch", "text_dim"])
def test_bad_inputs_raise(params, latent_shape, t_shape, ctx_shape, match):
  rng = np.random.default_rng(0)
  args = [rng.standard_normal(s).astype(np.float32) for s in (latent_shape, t_shape, ctx_shape)]
  with pytest.raises(ValueError, match=match):
    wan.apply(CFG, params, *args)


def test_control_without_layer_axis_raises(params, inputs):
  mask = np.ones((CFG.num_layers + 1, B, CFG.num_heads, 3, 3), bool)  # one layer too many
  with pytest.raises(ValueError, match="num_layers=2"):
    wan.apply(CFG, params, *inputs, _RecordingHook(jnp.asarray(mask)))


@pytest.mark.parametrize("mode", ["sparse", "dense_map"])
def test_block_sparse_backends_through_the_model(params, inputs, mode):
  """The real pallas_kernels path: an all-True mask reproduces dense attention and
  the map modes stack a sparsity map per layer."""
  from modjax.control import AttentionControl
  n = 1  # 12 tokens in one block of 128
  mask = np.ones((CFG.num_layers, B, CFG.num_heads, n, n), bool) if mode == "sparse" else None
  control = AttentionControl(block_mask=mask, mode=mode)
  forward = jax.jit(lambda p, x, t, c, control: wan.apply(CFG, p, x, t, c, control))
  out, stats = forward(params, *inputs, control)
  dense, _ = _forward(CFG)(params, *inputs)
  chex.assert_trees_all_close(out, dense, atol=1e-4, rtol=1e-4)
  if mode == "dense_map":
    chex.assert_shape(stats["sparsity_map"], (CFG.num_layers, B, CFG.num_heads, n, n))
