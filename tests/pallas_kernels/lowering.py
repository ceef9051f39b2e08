"""Lower a jitted function for a platform this machine cannot run (Triton IR /
Mosaic MLIR are produced in Python), skipping only on environment limits."""

import jax
import pytest


def lower(fn, platform, *args):
  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  except Exception as e:  # pylint: disable=broad-except
    msg = f"{type(e).__name__}: {e}"
    # Environment limits (no compiler for the platform in this jaxlib), not
    # kernel bugs: skip. Pallas lowering errors fail the test.
    if ("Lowering" not in type(e).__name__ and "lowering" not in str(e)[:200]
        and ("handler" in msg or "not supported" in msg or "plugin" in msg
             or "Unknown backend" in msg or "platform" in msg.lower())):
      pytest.skip(f"cannot lower for {platform} here: {msg[:200]}")
    raise
