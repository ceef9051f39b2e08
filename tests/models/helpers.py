"""Shared helpers of the model tests."""

import jax
import jax.numpy as jnp
import numpy as np

from models import wan


def random_params(config, seed=0):
  """Fresh normal params of the right shapes (no init compile), in the config's layout."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                      wan.param_shapes(config))
