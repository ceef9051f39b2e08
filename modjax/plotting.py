"""PNG figures of what MOD-DiT decided: masks, sparsity maps, density over steps.

matplotlib is optional (the `plot` extra); every function returns a
`matplotlib.figure.Figure` (no pyplot state, any backend: `display(fig)` in a
notebook) and writes `path` when given.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from modjax.schedule import StepKind


def _figure(**kwargs):
  from matplotlib.figure import Figure
  return Figure(layout="constrained", **kwargs)


def _finish(fig, path: Optional[str]):
  if path:
    fig.savefig(path, dpi=120)
  return fig


def plot_maps(state, *, layer: int = 0, row: int = 0, heads=None, path: Optional[str] = None):
  """For each head: the block mask in use and the history map prev_map (S,
  1 = negligible block) of a MODState at one layer and batch row."""
  mask = np.asarray(state.mask[layer, row])
  smap = np.asarray(state.prev_map[layer, row], np.float32)
  heads = range(mask.shape[0]) if heads is None else heads
  heads = list(heads)
  fig = _figure(figsize=(3 * len(heads), 6))
  axes = fig.subplots(2, len(heads), squeeze=False)
  for c, h in enumerate(heads):
    axes[0, c].imshow(mask[h], cmap="gray_r", interpolation="nearest")
    axes[0, c].set_title(f"mask L{layer} h{h} ({mask[h].mean():.0%})")
    im = axes[1, c].imshow(smap[h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[1, c].set_title(f"sparsity map L{layer} h{h}")
  for ax in axes.ravel():
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
  fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8)
  return _finish(fig, path)


def plot_density(out, *, path: Optional[str] = None):
  """Fraction of blocks computed per step (one line per layer), step kinds shaded."""
  density = np.asarray(out.density)
  kinds = np.asarray(out.step_kinds)
  fig = _figure(figsize=(7, 3.2))
  ax = fig.subplots()
  colors = {StepKind.DENSE: "#dddddd", StepKind.MAP: "#ffd59e", StepKind.REFRESH: "#b3d4ff"}
  for s, k in enumerate(kinds):
    if k in colors:
      ax.axvspan(s - 0.5, s + 0.5, color=colors[k], lw=0)
  for layer in range(density.shape[1]):
    ax.plot(density[:, layer], lw=1, alpha=0.8)
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("denoising step (grey dense, orange map, blue refresh)")
  ax.set_ylabel("blocks computed")
  return _finish(fig, path)
