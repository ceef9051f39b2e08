"""Compacted block tables: the sparse form of a block mask that the kernels read.

A block mask is bool [..., n, n]: entry (i, j) says query block i attends to key
block j. The kernels do not scan mask rows; they loop over a row's active key
blocks only, read from a table:

  indices  int32 [..., n, w]  active key-block ids of each query-block row in
                              ascending order; entries past the row's count
                              repeat the row's last valid id (so a pipelined
                              loader that follows the table re-fetches nothing
                              new), and rows with count 0 are padded with 0;
  counts   int32 [..., n]     number of valid entries of each row (<= w).

The width w is static (default n). With a smaller `max_width`, rows with more
than `max_width` active blocks are *truncated* to their first `max_width`
blocks: the traced mask cannot be checked at trace time, so pick `max_width`
from a static bound (MOD-DiT: min(n, top_k + blocks_per_frame)).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "BlockTable",
    "compact_block_mask",
    "block_mask_from_table",
    "dense_block_table",
    "table_or_dense",
    "check_block_table",
]


@struct.dataclass
class BlockTable:
  """Per query-block list of active key blocks (see the module docstring).

  Attributes:
    indices: int32 [..., n, w], ascending active key-block ids, padded by
      repeating the last valid id (0 for empty rows).
    counts: int32 [..., n], number of valid entries per row.
    canonical: static; True for tables built here (`compact_block_mask`,
      `dense_block_table`), which are ascending and duplicate-free as above.
      The kernels rely on that (the ragged last key block must be a row's last
      entry), so the public entry points canonicalise every other table.
      `replace()` clears it unless it is passed; `jax.tree.map` keeps it, so
      rebuild edited tables with `compact_block_mask` (or pass canonical=False).
  """

  indices: jax.Array
  counts: jax.Array
  canonical: bool = struct.field(pytree_node=False, default=False)

  @property
  def num_blocks(self) -> int:
    """n, the number of query (and key) blocks."""
    return self.indices.shape[-2]

  @property
  def width(self) -> int:
    """w, the static number of table entries per row."""
    return self.indices.shape[-1]

  @property
  def shape(self) -> tuple[int, ...]:
    """Leading (batch) shape of the table, e.g. (B, H)."""
    return self.indices.shape[:-2]

  def density(self) -> jax.Array:
    """Fraction of active blocks, over everything (float32 scalar)."""
    return jnp.sum(self.counts, dtype=jnp.float32) / (
        float(np.prod(self.counts.shape)) * self.num_blocks)

  def broadcast_to(self, shape: tuple[int, ...]) -> "BlockTable":
    """Broadcast the leading (batch) dims to `shape`."""
    n, w = self.indices.shape[-2:]
    return BlockTable(
        indices=jnp.broadcast_to(self.indices, (*shape, n, w)),
        counts=jnp.broadcast_to(self.counts, (*shape, n)), canonical=self.canonical)


def _replace(self, **updates) -> "BlockTable":
  """dataclasses.replace that no longer vouches for edited entries."""
  updates.setdefault("canonical", False)
  return dataclasses.replace(self, **updates)


# flax.struct installs its own `replace` on the class; this one clears the flag.
BlockTable.replace = _replace


def compact_block_mask(block_mask: jax.Array,
                       max_width: Optional[int] = None) -> BlockTable:
  """Compacts a bool block mask [..., n, n] into a `BlockTable` of width w.

  Pure jnp and jit-able; w = `max_width` (static) or n. Rows with more than w
  active blocks keep their first w (lowest ids) and are silently truncated.

  Args:
    block_mask: bool [..., n, n] (any leading dims).
    max_width: static table width in [1, n]; None means n.
  Returns:
    BlockTable with indices int32 [..., n, w] and counts int32 [..., n].
  """
  block_mask = jnp.asarray(block_mask)
  if block_mask.ndim < 2 or block_mask.shape[-1] != block_mask.shape[-2]:
    raise ValueError(
        "block_mask must have shape [..., n, n] (square in the last two dims), "
        f"got {block_mask.shape}")
  if block_mask.dtype != jnp.bool_:
    raise ValueError(f"block_mask must be bool, got {block_mask.dtype}")
  n = block_mask.shape[-1]
  w = n if max_width is None else int(max_width)
  if not 1 <= w <= n:
    raise ValueError(f"max_width must be in [1, n={n}], got {max_width}")

  cols = jnp.arange(n, dtype=jnp.int32)
  # Active columns score n - j (> 0, larger for lower ids), inactive -1: the
  # top w scores are the first w active columns in ascending order.
  score = jnp.where(block_mask, n - cols, -1).astype(jnp.int32)
  top, _ = jax.lax.top_k(score, w)
  raw = (n - top).astype(jnp.int32)                          # valid where top > 0
  counts = jnp.minimum(jnp.sum(block_mask, axis=-1, dtype=jnp.int32), w)
  last = jnp.take_along_axis(raw, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  slot = jnp.arange(w, dtype=jnp.int32)
  indices = jnp.where(slot < counts[..., None], raw, last).astype(jnp.int32)
  return BlockTable(indices=indices, counts=counts, canonical=True)


def block_mask_from_table(table: BlockTable, n: Optional[int] = None) -> jax.Array:
  """Expands a `BlockTable` back into a bool block mask [..., n, n].

  Only the first counts[...] entries of each row count; padding is ignored.
  """
  n = table.num_blocks if n is None else int(n)
  if n != table.num_blocks:
    raise ValueError(
        f"n={n} does not match the table's number of query blocks "
        f"{table.num_blocks} (indices shape {table.indices.shape})")
  w = table.width
  valid = jnp.arange(w, dtype=jnp.int32) < table.counts[..., None]   # [..., n, w]
  idx = jnp.where(valid, table.indices, n)                           # n = dropped
  lead = idx.shape[:-1]
  flat = idx.reshape(-1, w)
  rows = jnp.arange(flat.shape[0])[:, None]
  out = jnp.zeros((flat.shape[0], n + 1), jnp.bool_)
  out = out.at[rows, flat].set(True)
  return out[:, :n].reshape(*lead, n)


def dense_block_table(shape: tuple[int, ...], n: int) -> BlockTable:
  """The table of an all-True mask: every row lists 0..n-1."""
  indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (*shape, n, n))
  counts = jnp.full((*shape, n), n, jnp.int32)
  return BlockTable(indices=indices, counts=counts, canonical=True)


def table_or_dense(table: Optional[BlockTable], seq_len: int,
                   block_size: int) -> BlockTable:
  """`table`, or for None (dense attention) the all-active [1, 1] table."""
  if table is not None:
    return table
  return dense_block_table((1, 1), -(-seq_len // block_size))


def check_block_table(table: BlockTable, n: Optional[int] = None,
                      name: str = "block_mask") -> None:
  """Static checks (shapes and dtypes only; values are traced) on a table."""
  if not isinstance(table, BlockTable):
    raise ValueError(f"{name} must be a BlockTable, got {type(table).__name__}")
  idx, cnt = table.indices, table.counts
  if idx.ndim < 2:
    raise ValueError(f"{name}.indices must be [..., n, w], got shape {idx.shape}")
  if cnt.shape != idx.shape[:-1]:
    raise ValueError(
        f"{name}.counts must have shape indices.shape[:-1] = {idx.shape[:-1]}, "
        f"got {cnt.shape}")
  if idx.dtype != jnp.int32 or cnt.dtype != jnp.int32:
    raise ValueError(
        f"{name}.indices and .counts must be int32, got {idx.dtype} and {cnt.dtype}")
  if n is not None and idx.shape[-2] != n:
    raise ValueError(
        f"{name} has {idx.shape[-2]} query-block rows, expected n={n}")
  if idx.shape[-1] < 1 or (n is not None and idx.shape[-1] > n):
    raise ValueError(
        f"{name}.indices width must be in [1, n={n}], got {idx.shape[-1]}")
