"""Seconds by stage of one pipeline call, and the one log line per stage."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional


class Stages:
  """timings: seconds by stage name (a stage run twice adds up); say: the caller's log
  (e.g. print), or nothing.

  >>> stages = Stages(print)
  >>> with stages("text_encode"):
  ...   jax.block_until_ready(encode(...))      # block inside: the time is the work's
  >>> stages.say(f"text encoding {stages.timings['text_encode']:.1f} s")
  """

  def __init__(self, log: Optional[Callable[[str], None]] = None):
    self.timings: dict[str, float] = {}
    self._log = log

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - t0)

  def add(self, name: str, seconds: float) -> None:
    self.timings[name] = self.timings.get(name, 0.0) + float(seconds)

  def say(self, line: str) -> None:
    if self._log is not None:
      self._log(line)
