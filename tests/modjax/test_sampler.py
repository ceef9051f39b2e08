"""The one-compile scan sampler with every attention policy, on the tiny model."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import wan
import modjax
from modjax.schedule import StepKind

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 8, 16, 16, 8  # 512 tokens: 8 blocks of 64, one block per frame
STEPS = 8
MOD_SMALL = dict(block_size=64, warmup_steps=4, interval=2, implementation="xla")


@functools.lru_cache(maxsize=None)
def _model():
  config = wan.WanConfig.tiny()
  params = wan.init_params(config, jax.random.key(0), FRAMES, HEIGHT, WIDTH, TEXT_LEN)
  return config, params


def _inputs(seed=1, batch=1):
  config, _ = _model()
  kc, kn, kx = jax.random.split(jax.random.key(seed), 3)
  ctx = jax.random.normal(kc, (batch, TEXT_LEN, config.text_dim))
  neg = jax.random.normal(kn, (batch, TEXT_LEN, config.text_dim))
  return ctx, neg, kx


def _settings(attention, steps=STEPS, **kw):
  return modjax.SamplerSettings(frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                                guidance_scale=4.0, shift=3.0, attention=attention, **kw)


def _run(attention, loop="scan", seed=1):
  config, params = _model()
  fn = jax.jit(modjax.sample_fn(wan.WanFamily(config), _settings(attention), loop=loop)) if loop == "scan" else \
      modjax.sample_fn(wan.WanFamily(config), _settings(attention), loop=loop)
  return fn(params, *_inputs(seed))


def test_step_kinds_follow_the_reference_schedule():
  kinds = modjax.mod_step_kinds(50, 12, 10)
  assert (kinds[:10] == StepKind.DENSE).all()
  assert (kinds[10:12] == StepKind.MAP).all()
  assert list(np.flatnonzero(kinds == StepKind.REFRESH)) == [21, 31, 41]
  assert (kinds[12:21] == StepKind.SPARSE).all() and kinds[49] == StepKind.SPARSE


def test_flow_sigmas_are_shifted_and_end_at_zero():
  s = modjax.flow_sigmas(10, shift=5.0)
  assert s.shape == (11,) and s[0] == 1.0 and s[-1] == 0.0
  assert (np.diff(s) < 0).all()
  assert s[5] > 0.5  # the shift spends more steps at high noise


def test_dense_sampler_compiles_once():
  config, params = _model()
  fn = jax.jit(chex.assert_max_traces(modjax.sample_fn(wan.WanFamily(config), _settings(modjax.DenseConfig())), n=1))
  a = fn(params, *_inputs(1))
  b = fn(params, *_inputs(2))
  assert not np.allclose(a.latents, b.latents)
  chex.assert_tree_all_finite(a.latents)


def test_mod_schedule_runs_in_one_compiled_scan():
  config, params = _model()
  mod = modjax.MODConfig(top_k=6, **MOD_SMALL)
  fn = jax.jit(chex.assert_max_traces(modjax.sample_fn(wan.WanFamily(config), _settings(mod)), n=1))
  out = fn(params, *_inputs(1))
  fn(params, *_inputs(3))  # a second call must not retrace
  kinds = np.asarray(out.step_kinds)
  assert set(kinds.tolist()) == {StepKind.DENSE, StepKind.MAP, StepKind.SPARSE, StepKind.REFRESH}
  density = np.asarray(out.density)
  chex.assert_shape(density, (STEPS, config.num_layers))
  assert (density[kinds == StepKind.DENSE] == 1).all()
  assert (density[kinds == StepKind.SPARSE] < 1).all()
  assert 0.0 < modjax.sparsity(out) < 1.0
  state = out.state
  chex.assert_shape(state.mask, (config.num_layers, 2, config.num_heads, 8, 8))
  assert not np.isnan(np.asarray(state.prev_map, np.float32)).any()
  # the diagonal guard: no query row is ever empty
  assert np.asarray(state.mask)[..., np.arange(8), np.arange(8)].all()


@pytest.mark.parametrize("refresh", ["dense", "sparse"])
def test_mod_with_all_lines_reproduces_dense(refresh):
  dense = _run(modjax.DenseConfig(implementation="xla"))
  n = 8
  mod = _run(modjax.MODConfig(top_k=3 * n - 1, refresh=refresh, **MOD_SMALL))
  assert np.asarray(mod.density).min() == 1.0
  chex.assert_trees_all_close(mod.latents, dense.latents, atol=2e-4, rtol=2e-4)


def test_sparse_refresh_keeps_prev_map_free_of_nan():
  out = _run(modjax.MODConfig(top_k=4, refresh="sparse", **MOD_SMALL))
  prev = np.asarray(out.state.prev_map, np.float32)
  assert not np.isnan(prev).any()
  assert ((prev >= 0) & (prev <= 1)).all()
  assert modjax.sparsity(out) > 0.3


def test_scan_and_python_loop_give_the_same_video():
  mod = modjax.MODConfig(top_k=6, **MOD_SMALL)
  a = _run(mod, loop="scan")
  b = _run(mod, loop="python")
  chex.assert_trees_all_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(a.density), np.asarray(b.density))


@pytest.mark.parametrize("baseline", [
    modjax.StaticWindowConfig(density=0.4, block_size=64, warmup_steps=4, implementation="xla"),
    modjax.OracleConfig(density=0.4, block_size=64, warmup_steps=4, implementation="xla"),
    modjax.warmup_reuse(top_k=6, **MOD_SMALL),
], ids=lambda c: type(c).__name__ + getattr(c, "refresh", ""))
def test_baselines_run_sparse_after_warmup(baseline):
  out = _run(baseline)
  kinds = np.asarray(out.step_kinds)
  assert StepKind.REFRESH not in kinds
  assert (np.asarray(out.density)[kinds == StepKind.SPARSE] < 1).all()
  chex.assert_tree_all_finite(out.latents)


def test_sparser_masks_move_the_result_away_from_dense():
  dense = _run(modjax.DenseConfig(implementation="xla"))
  mod = _run(modjax.MODConfig(top_k=2, **MOD_SMALL))
  assert float(jnp.abs(mod.latents - dense.latents).max()) > 1e-3


def test_bad_settings_raise_clear_errors():
  with pytest.raises(ValueError, match="top_k"):
    modjax.MODConfig(top_k=0)
  with pytest.raises(ValueError, match="block_size"):
    modjax.MODConfig(block_size=96)
  with pytest.raises(ValueError, match="refresh"):
    modjax.MODConfig(refresh="sometimes")
  with pytest.raises(ValueError, match="guidance_scale"):
    modjax.SamplerSettings(frames=1, height=2, width=2, guidance_scale=0.5)
  config, _ = _model()
  with pytest.raises(ValueError, match="height"):
    modjax.sample_fn(wan.WanFamily(config), modjax.SamplerSettings(frames=2, height=3, width=4))


def test_mask_recall_is_recorded_per_step_and_layer():
  config, params = _model()
  settings = _settings(modjax.MODConfig(top_k=3, **MOD_SMALL), record_recall=True)
  out = jax.jit(modjax.sample_fn(wan.WanFamily(config), settings))(params, *_inputs(1))
  recall, kinds = np.asarray(out.mask_recall), np.asarray(out.step_kinds)
  chex.assert_shape(recall, (STEPS, config.num_layers))
  assert (recall[kinds == StepKind.DENSE] == 1).all()
  sparse = recall[kinds == StepKind.SPARSE]
  assert ((sparse > 0) & (sparse < 1)).all()
  assert _run(modjax.DenseConfig()).mask_recall is None
