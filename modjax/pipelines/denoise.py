"""The denoising stage of a pipeline: the seeded run key and noise, one compiled
sampler per static setup for the life of the pipeline, the timed run and its
sparsity report.

The run key of a call is `jax.random.key(seed)`. Without given latents the
sampler draws the initial noise from it, normal(key, [B, C, F, H, W]) float32
(`initial_noise` is that same draw); a stochastic scheduler (CogVideoX's DPM)
draws its step noise from fold_in(key, 1) (see `modjax.sampler.sample_fn`).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from modjax import sampler as sampler_lib
from modjax import sharding as sharding_lib
from modjax.pipelines.stages import Stages


def run_key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def initial_noise(seed: int, shape: Sequence[int]) -> jax.Array:
  """The float32 noise the sampler draws from `run_key(seed)` when no latents are given."""
  return jax.random.normal(run_key(seed), tuple(shape), jnp.float32)


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


class SamplerCache:
  """Compiled samplers by (family, settings, callbacks, argument shapes, mesh): each
  compiles once for the life of the pipeline that holds the cache. `values()` gives
  the (compiled, `Sampler`) pairs, oldest first."""

  def __init__(self):
    self._entries: dict = {}

  def __len__(self) -> int:
    return len(self._entries)

  def values(self):
    return self._entries.values()

  def get(self, family, settings: sampler_lib.SamplerSettings, callbacks, args, mesh=None):
    """(compiled sampler taking placed arguments, its Sampler, seconds spent compiling:
    0 when cached). args: (params, context, neg_context, key[, noise])."""
    par = sharding_lib.resolve(mesh)
    key = (family, settings, tuple(callbacks), _signature(args[1:]), par)
    if key in self._entries:
      return self._entries[key] + (0.0,)
    t0 = time.perf_counter()
    sampler = sampler_lib.Sampler(family, settings, callbacks=callbacks, mesh=par)
    compiled = sampler.lower(*args).compile()
    self._entries[key] = (compiled, sampler)
    return compiled, sampler, time.perf_counter() - t0


def denoise(cache: SamplerCache, family, settings: sampler_lib.SamplerSettings, params, context,
            neg_context, key, noise=None, *, stages: Stages,
            callbacks: Sequence[Callable[[int, int], None]] = (), mesh=None,
            describe: str = "") -> tuple[sampler_lib.SampleOutput, float]:
  """Compiles (once) and runs the denoising scan; adds "compile" and "denoise" to
  stages.timings and logs one line for each. Returns (SampleOutput, sparsity).
  describe: the pipeline's words on the run, after the sizes in the compile line."""
  args = (params, context, neg_context, key) + (() if noise is None else (noise,))
  compiled, sampler, seconds = cache.get(family, settings, callbacks, args, mesh)
  stages.add("compile", seconds)
  layout = family.attention_layout(settings.frames, settings.height, settings.width)
  extra = f", {describe}" if describe else ""
  stages.say(f"compiled the {settings.num_inference_steps}-step sampler in {seconds:.1f} s "
             f"({settings.frames}x{settings.height}x{settings.width} latents, "
             f"{layout.video_tokens} video tokens of {layout.seq_len}{extra})")
  placed = sampler.place(*args)
  t0 = time.perf_counter()
  out = compiled(*placed)
  jax.block_until_ready(out.latents)
  seconds = time.perf_counter() - t0
  stages.add("denoise", seconds)
  sparsity = sampler_lib.sparsity(out)
  stages.say(f"denoised in {seconds:.1f} s (sparsity {sparsity:.1%})")
  return out, sparsity
