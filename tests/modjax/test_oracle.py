"""The mass oracle policy: per-row budget, density, dense layers forced on (the
control and sampler run it end to end in tests/modjax/test_sampler.py and
tests/benchmarks/test_quality.py)."""

import chex
import numpy as np
import pytest

import modjax
from modjax import policies
from modjax.schedule import StepKind


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
