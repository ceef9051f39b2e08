"""Host callbacks the sampler calls after each denoising step.

A callback is any `fn(step: int, num_steps: int)`. The sampler calls it through
`jax.debug.callback` after the step's new latents exist (ordered, so calls come
in step order), which is the only host round trip inside the compiled loop.
State lives in the callback object, never in a module.
"""

from __future__ import annotations

import time


class TqdmProgress:
  """A tqdm bar over the denoising steps (one bar per sampling run)."""

  def __init__(self, desc: str = "denoising"):
    self.desc, self._bar = desc, None

  def __call__(self, step: int, num_steps: int) -> None:
    from tqdm.auto import tqdm
    if step == 0 or self._bar is None:
      if self._bar is not None:
        self._bar.close()
      self._bar = tqdm(total=num_steps, desc=self.desc, unit="step")
    self._bar.update(1)
    if step == num_steps - 1:
      self._bar.close()
      self._bar = None


class StepTimer:
  """Host `time.perf_counter()` after each step of the last run (benchmarks).

  A step's stamp is taken once its latents are computed, so consecutive
  differences are per-step times; the first step's time needs the start time
  the caller took before launching the run.
  """

  def __init__(self):
    self.times: list[float] = []

  def __call__(self, step: int, num_steps: int) -> None:
    if step == 0:
      self.times = []
    self.times.append(time.perf_counter())
