"""The mass oracle through the policy, the control and the sampler (tiny model)."""

import chex
import jax
import numpy as np
import pytest

import modjax
from models import wan
from modjax import policies
from modjax.schedule import StepKind
from tests.modjax.test_sampler import _inputs, _model, _settings


def _geometry(layers=3):
  return policies.Geometry(num_layers=layers, batch=2, heads=2, seq_len=8 * 64,
                           tokens_per_frame=64, block_size=64)


@pytest.mark.parametrize("density,keep", [(0.4, 3), (0.3, 2), (1.0, 8), (0.01, 1)])
def test_oracle_budget_is_per_row(density, keep):
  policy = policies.OraclePolicy(modjax.OracleConfig(density=density, block_size=64, warmup_steps=2),
                                 _geometry())
  assert policy.keep == keep
  np.testing.assert_allclose(policy.density((), StepKind.SPARSE), keep / 8)
  np.testing.assert_allclose(policy.density((), StepKind.DENSE), 1.0)
  control = policy.control((), StepKind.SPARSE)
  assert control.mode == "oracle" and control.oracle_keep == keep and control.block_mask is None


def test_oracle_dense_layers_are_forced_on():
  policy = policies.OraclePolicy(modjax.OracleConfig(density=0.25, block_size=64, dense_layers=1),
                                 _geometry())
  control = policy.control((), StepKind.SPARSE)
  forced = np.asarray(control.block_mask)
  chex.assert_shape(forced, (3, 2, 2, 8, 8))
  assert forced[0].all() and not forced[1:].any()
  np.testing.assert_allclose(policy.density((), StepKind.SPARSE), [1.0, 0.25, 0.25])


def test_oracle_samples_with_more_recall_than_mod():
  """A sparse oracle keeps the blocks with the most mass of each step, so its mask
  recall beats a sparser-or-equal MOD mask's (density 0.25 vs MOD's >= 0.4 budget)."""
  config, params = _model()
  settings = _settings(modjax.OracleConfig(density=0.25, block_size=64, warmup_steps=2,
                                           implementation="xla"), record_recall=True)
  out = jax.jit(modjax.sample_fn(wan.WanFamily(config), settings))(params, *_inputs(1))
  kinds = np.asarray(out.step_kinds)
  recall = np.asarray(out.mask_recall)[kinds == StepKind.SPARSE]
  assert modjax.sparsity(out) == pytest.approx(0.75)
  mod = jax.jit(modjax.sample_fn(wan.WanFamily(config), _settings(
      modjax.MODConfig(top_k=1, block_size=64, warmup_steps=2, interval=2, implementation="xla"),
      record_recall=True)))(params, *_inputs(1))
  mod_kinds = np.asarray(mod.step_kinds)
  assert modjax.sparsity(mod) >= 0.6
  assert recall.mean() > np.asarray(mod.mask_recall)[mod_kinds == StepKind.SPARSE].mean()
