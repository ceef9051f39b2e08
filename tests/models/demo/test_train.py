"""Demo training: conditioning, overfitting, checkpoint/resume, bf16 export."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.demo import checkpoint as C
from models.demo import data as demo_data
from models.demo import train as T

# One tiny config for the whole module, so every test reuses the compiled step.
TC = T.TrainConfig(model="tiny", batch_size=2, frames=2, height=8, width=8, dtype="float32",
                   lr=3e-3, warmup_steps=1, total_steps=1000, label_dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def fixed_batch():
  return demo_data.sample_batch(jax.random.key(5), TC.batch_size, TC.frames, TC.height, TC.width)


@pytest.fixture(scope="module")
def trained(fixed_batch):
  """(state before, state after 30 steps on the fixed batch, metrics per step)."""
  state0 = T.init_state(TC)
  before = jax.tree.map(jnp.copy, state0)
  state, losses = state0, []
  for _ in range(30):
    state, metrics = T.train_step_on(TC, state, *fixed_batch)
    losses.append(metrics)
  return before, state, jax.device_get(losses)


@jax.jit
def _fixed_loss_jit(params, videos, labels):
  t = jnp.array([0.3, 0.7])
  noise = jax.random.normal(jax.random.key(9), videos.shape)
  return T.flow_matching_loss(TC.dit_config(), params, videos, labels, t, noise)


def _fixed_loss(params, fixed_batch):
  return float(_fixed_loss_jit(params, *fixed_batch))


def test_demo_config_is_4096_tokens_and_small():
  config = T.demo_config()
  assert config.tokens(T.DEMO_FRAMES, T.DEMO_HEIGHT, T.DEMO_WIDTH) == 4096
  assert config.in_channels == config.out_channels == 3 and config.patch_size == (1, 2, 2)
  assert config.head_dim == 64
  shapes = jax.eval_shape(lambda: T.init_demo_params(
      config, jax.random.key(0), T.DEMO_FRAMES, T.DEMO_HEIGHT, T.DEMO_WIDTH))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert n * 2 <= 15e6  # bf16 checkpoint <= 15 MB
  chex.assert_shape(shapes["label_embedding"], (demo_data.NUM_CLASSES + 1, C.TEXT_LEN, C.TEXT_DIM))


def test_learning_rate_is_optax_warmup_cosine_with_a_traced_length():
  import optax
  tc = T.TrainConfig(lr=2e-3, warmup_steps=10, total_steps=200, end_lr_fraction=0.1)
  want = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, 200, end_value=2e-4)
  steps = np.array([0, 1, 5, 10, 11, 50, 150, 199, 200, 500])
  np.testing.assert_allclose(T.learning_rate(tc, steps, 200), want(steps), rtol=1e-5, atol=1e-9)
  # a longer schedule (re-planned to the time budget) is the same curve stretched
  fn = jax.jit(lambda s, total: T.learning_rate(tc, s, total))
  np.testing.assert_allclose(fn(100, 190), optax.warmup_cosine_decay_schedule(
      0.0, 2e-3, 10, 190, end_value=2e-4)(100), rtol=1e-5)
  assert float(fn(400, 400)) == pytest.approx(2e-4)


def test_label_context(trained):
  params = trained[1].params
  labels = jnp.array([0, 3, C.NULL_LABEL])
  context = C.label_context(params, labels)
  chex.assert_shape(context, (3, C.TEXT_LEN, TC.dit_config().text_dim))
  np.testing.assert_array_equal(context[2], params["label_embedding"][C.NULL_LABEL])
  assert not np.allclose(context[0], context[1])


def test_sample_t_is_inside_the_unit_interval():
  t = T.sample_t(jax.random.key(0), 4096, TC)
  assert 0.0 < float(t.min()) and float(t.max()) < 1.0 and abs(float(t.mean()) - 0.5) < 0.02


def test_overfits_a_fixed_batch(trained, fixed_batch):
  before, after, metrics = trained
  assert int(after.step) == 30
  loss0 = _fixed_loss(before.params, fixed_batch)
  loss1 = _fixed_loss(after.params, fixed_batch)
  assert loss1 < 0.6 * loss0, (loss0, loss1)
  train_losses = [float(m["loss"]) for m in metrics]
  assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5])
  # The EMA moved off the init, towards the params.
  delta = lambda a, b: sum(float(jnp.abs(x - y).sum()) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert 0 < delta(after.ema, before.params)


@pytest.mark.parametrize("fmt", ["npz", "npz_sharded", "orbax"])
def test_checkpoint_resume_gives_the_same_state(trained, fixed_batch, tmp_path, monkeypatch, fmt):
  if fmt == "orbax" and T._orbax() is None:
    pytest.skip("orbax not importable")
  if fmt == "npz_sharded":
    monkeypatch.setattr(T, "SHARD_BYTES", 20_000)
    fmt = "npz"
  _, state, _ = trained
  state = jax.tree.map(jnp.copy, state)
  history = T._new_history()
  history["step"].append(30)
  history["loss"].append(1.0)
  assert T.save_checkpoint(tmp_path, state, TC, history, fmt) == fmt
  if fmt == "npz" and T.SHARD_BYTES > 20_000:  # shards of an older checkpoint go; the newest is what loads
    T.save_checkpoint(tmp_path, dataclasses.replace(state, step=state.step - 1), TC, history, fmt)
    T.save_checkpoint(tmp_path, state, TC, history, fmt)
    assert [p.name for p in tmp_path.glob("state-*.npz")] == ["state-0000030-0.npz"]
  if T.SHARD_BYTES == 20_000:
    assert len(list(tmp_path.glob("state-*.npz"))) > 3
  restored_state, restored_tc, restored_history = T.load_checkpoint(tmp_path)
  assert restored_tc == TC and restored_history == history
  chex.assert_trees_all_equal(restored_state, state)
  chex.assert_trees_all_equal_structs(restored_state, state)
  # Training on continues identically from either copy.
  a, _ = T.train_step_on(TC, jax.tree.map(jnp.copy, state), *fixed_batch)
  b, _ = T.train_step_on(TC, restored_state, *fixed_batch)
  chex.assert_trees_all_equal(a, b)


def test_no_checkpoint_is_none(tmp_path):
  assert T.load_checkpoint(tmp_path) is None


def test_bf16_export_round_trip(trained, tmp_path):
  _, state, _ = trained
  config = TC.dit_config()
  path = tmp_path / "ship" / "demo.safetensors"
  C.export_demo(path, config, state.ema, frames=TC.frames, height=TC.height, width=TC.width,
                extra_metadata={"train_step": 30})
  assert path.exists() and path.with_suffix(".json").exists()
  assert (path.parent / C.LABELS_FILE).exists()
  loaded_config, params, meta = C.load_demo_params(path)
  assert loaded_config == dataclasses.replace(config, dtype="float32")
  expected = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), state.ema)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, expected))
  assert meta["frames"] == TC.frames and meta["train_step"] == 30
  assert meta["num_inference_steps"] == C.DEMO_SAMPLING["num_inference_steps"]
  # The file really is bf16: about 2 bytes a parameter.
  n = sum(x.size for x in jax.tree.leaves(state.ema["dit"]))
  assert path.stat().st_size < 2 * n + 20_000
  json.loads(path.with_suffix(".json").read_text())


def test_load_demo_gives_a_pipeline_model(trained, tmp_path):
  from modjax import pipelines
  _, state, _ = trained
  path = tmp_path / "demo.safetensors"
  C.export_demo(path, TC.dit_config(), state.ema, frames=TC.frames, height=TC.height,
                width=TC.width)
  model = pipelines.load_model(str(path))
  assert isinstance(model, pipelines.LoadedModel) and model.pixel_space and model.num_labels == 28
  assert (model.defaults.frames, model.defaults.height, model.defaults.width) == (2, 8, 8)
  ctx, neg = model.make_context(3, jax.random.key(0), label=4)
  chex.assert_shape([ctx, neg], (3, C.TEXT_LEN, TC.dit_config().text_dim))
  np.testing.assert_allclose(neg[0], np.asarray(jnp.asarray(
      state.ema["label_embedding"][C.NULL_LABEL], jnp.bfloat16), np.float32))
  with pytest.raises(ValueError, match="label"):
    model.make_context(1, jax.random.key(0), label=demo_data.NUM_CLASSES)


@pytest.mark.slow
def test_cli_runs_resumes_and_exports(tmp_path):
  args = ["--out", str(tmp_path), "--model", "tiny", "--batch-size", "2", "--frames", "2",
          "--height", "8", "--width", "8", "--dtype", "float32", "--log-every", "5",
          "--eval-every", "10", "--checkpoint-every", "10"]
  assert T.main(args + ["--total-steps", "12"]) == 0
  meta = json.loads((tmp_path / "meta.json").read_text())
  assert meta["step"] == 12
  assert (tmp_path / "demo.safetensors").exists()
  assert T.main(args + ["--total-steps", "20", "--lr", "1.0"]) == 0  # resumes; lr ignored
  meta = json.loads((tmp_path / "meta.json").read_text())
  assert meta["step"] == 20 and meta["train_config"]["lr"] == T.TrainConfig().lr
  history = json.loads((tmp_path / "loss.json").read_text())
  assert history["step"][-1] == 20 and history["step"][0] <= 12


def test_init_from_export_starts_from_its_weights(trained, tmp_path):
  _, state, _ = trained
  path = tmp_path / "demo.safetensors"
  C.export_demo(path, TC.dit_config(), state.ema, frames=TC.frames, height=TC.height,
                width=TC.width, extra_metadata={"train_step": 30, "train_seconds": 2.5})
  warm, meta = T.init_state_from_export(TC, path)
  assert int(warm.step) == 0 and meta["train_step"] == 30
  expected = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), state.ema)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, warm.params), expected)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, warm.ema), expected)
  # A fresh optimizer: Adam's moments are zero, not the trained run's.
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(warm.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  # ... and it trains from there: the loss on the fixed batch starts where the export is.
  assert _fixed_loss(warm.params, _fixed_batch_of()) == pytest.approx(
      _fixed_loss(expected, _fixed_batch_of()), rel=1e-6)


def _fixed_batch_of():
  return demo_data.sample_batch(jax.random.key(5), TC.batch_size, TC.frames, TC.height, TC.width)


def test_init_from_export_refuses_another_model_or_size(trained, tmp_path):
  _, state, _ = trained
  path = tmp_path / "demo.safetensors"
  C.export_demo(path, TC.dit_config(), state.ema, frames=TC.frames, height=TC.height,
                width=TC.width)
  with pytest.raises(ValueError, match="--init-from .* other video sizes"):
    T.init_state_from_export(dataclasses.replace(TC, frames=4), path)
  with pytest.raises(ValueError, match="--init-from .* is not a 'demo' model"):
    T.init_state_from_export(dataclasses.replace(TC, model="demo"), path)


@pytest.mark.slow
def test_cli_init_from_records_the_chain(tmp_path):
  args = ["--model", "tiny", "--batch-size", "2", "--frames", "2", "--height", "8", "--width", "8",
          "--dtype", "float32", "--log-every", "5", "--eval-every", "10", "--checkpoint-every", "10"]
  first, second = tmp_path / "a", tmp_path / "b"
  assert T.main(["--out", str(first), "--total-steps", "6"] + args) == 0
  assert T.main(["--out", str(second), "--total-steps", "4", "--init-from",
                 str(first / "demo.safetensors")] + args) == 0
  _, _, meta = C.load_demo_params(second / "demo.safetensors")
  assert meta["train_step"] == 4 and meta["total_train_step"] == 10
  assert [c["train_step"] for c in meta["init_chain"]] == [6, 4]
  assert meta["total_train_seconds"] == pytest.approx(
      sum(c["train_seconds"] for c in meta["init_chain"]), abs=0.2)
