"""The sampler over a `jax.sharding.Mesh`: sequence (Ulysses), CFG and head-balanced parallelism.

Under a mesh, the attention problem is the same problem on fewer heads. A mesh
has two named axes (`make_mesh`):

  "cfg"  the rows of the model batch (with guidance, rows = [cond..., uncond...],
         so with cfg=2 the conditional and unconditional passes run on different
         devices);
  "seq"  the tokens of every row, outside self-attention, and the heads inside it.

The one-device run is the mesh of size 1 (`make_mesh(1)`, the sampler's
default): the same shard_maps with collectives over axes of size 1, which are
dropped at trace time.

Where the communication is (all of it is XLA's, through `jax.shard_map`; there
is no engine here):

  * Activations [B, S, dim] are sharded P("cfg", "seq") everywhere outside
    self-attention: the two attention calls of each layer are shard_maps with
    sequence-sharded queries and outputs, and GSPMD propagates that layout
    through the projections, norms, RoPE, FFN and residuals between them (the
    tests check that the compiled sampler all-gathers no activation).
  * Self-attention (`Parallel.self_attention`): q, k, v [B, S/P, H, D] go
    through one all-to-all each (split heads, gather the sequence) to
    [B, S, H/P, D]: each device holds whole sequences of H/P heads, runs the
    block-sparse kernel (and the sparsity-map pass) on them with its own
    heads' block masks / tables, and one all-to-all sends the output back to
    [B, S/P, H, D]. Four all-to-alls per layer, each sending (P-1)/P of the
    device's [B/cfg, S/P, dim] slice.
  * Cross-attention (`Parallel.cross_attention`): local, queries sharded by
    sequence, the text keys/values whole on every device of the row shard.
  * Weights are replicated (`shard_weights=False`), or FSDP-style
    (`shard_weights=True`): every weight of at least `fsdp_min_bytes` is split
    over all devices along the contracting dim of its [..., in, out] kernel
    (`Parallel.param_spec`), and GSPMD all-gathers one layer's weight inside the
    layer scan where it meets the sequence-sharded activations.
  * Classifier-free guidance with cfg=2 combines the two halves of the
    velocity once per step (the latents and the scheduler state are
    replicated; they are small).

Padding. Ulysses needs S divisible by P. The sequence is padded with zeros
from S to S_pad = P * ceil(S / P) before each attention shard_map; right after
the first all-to-all every device holds whole sequences and slices the
padding off, so the kernels (and the sparsity map) see exactly S tokens; the
attention output is padded again before the reverse all-to-all and the padding
is sliced off after the shard_map. GSPMD shards the unpadded [B, S, dim]
activations in tiles of ceil(S / P) tokens, the same tiles, so padding and
slicing move no data. Results are exact (the tests compare with one device).

MOD state. Every leaf of the attention policy's state (MODState,
FixedMaskState: prev_map, features, block-diagonal mode, mask, table) has
leading dims [L, B, H] and is sharded P(None, "cfg", "seq") (`state_specs`):
the device that computes a head's attention holds that head's state. The
policy's init and update run inside shard_maps on those local slices, so they
cannot communicate; the policies are per (layer, row, head) computations, so
this is the one-device policy on fewer heads (a policy that mixed heads or
rows would have to say so here).

Head balancing. Heads have different densities and the device with the
densest heads sets the pace of every layer. With balancing (MOD only, P > 1)
the state carries a head order [L, B, H]: slot j of the state's head axis
holds head order[j], and slot j lives on device j // (H/P) of its row shard.
The attention gathers q, k, v heads into slot order before the first
all-to-all and the output back to head order after the last one; both are
local (every device holds all heads of its tokens there): four local gathers
of the device's [B/cfg, S/P, H, D] per layer (memory traffic, no
communication; none on dense steps, where the order does not matter).

When the order changes, the state would have to follow it across devices. It
changes once: the order is chosen from the first mask (after the first of the
two map steps; `balanced_order`, a greedy longest-first assignment of heads to
the least loaded device with a free slot, from per-head active-block counts
summed over the rows of each cfg shard, per layer, kept only where it lowers
that layer's slowest device) and adopted at the second map step. That step's
attention already runs in the new order, and its update rebuilds every state
leaf from that step's own sparsity map, except the fitted features of the
previous map step (3n floats per layer, row and head), the only history a map
step reads. So the only MOD state that ever crosses devices is those
features, at the map steps (XLA drops the re-layout of every leaf the map
update does not read; at the first map step it is the identity); after the
warm-up the state is never communicated. The order stays fixed after the
warm-up, chosen one step before the mask the sparse steps start from, and
refreshes move the masks; the benchmark reports the imbalance of the final
mask in natural and balanced layouts. `SampleOutput.state` is the state
as it lies on the mesh, in slot order, with `SampleOutput.head_order`;
`to_natural_order` re-lays it for inspection (that one gathers it).
`imbalance` / `head_imbalance` measure max/mean per-device work.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CFG, SEQ = "cfg", "seq"
AXES = (CFG, SEQ)
TOKENS = P(CFG, SEQ)          # [B, S, ...] activations, q/k/v outside self-attention
ROWS = P(CFG)                 # [B, ...] per-row arrays (text context, timesteps)
HEADS = P(CFG, SEQ)           # [B, H, ...] per-head arrays inside self-attention
STATE = P(None, CFG, SEQ)     # [L, B, H, ...] attention-policy state
REPLICATED = P()

__all__ = [
    "CFG", "SEQ", "TOKENS", "ROWS", "HEADS", "STATE", "REPLICATED", "Parallel", "make_mesh",
    "resolve", "shard_map", "allowed_degrees", "balanced_order", "device_work", "imbalance",
    "head_counts", "head_imbalance", "state_specs", "to_natural_order", "MeshPolicy",
    "BalancedState",
]


# ------------------------------------------------------------ jax versions

def _shard_map_impl():
  """jax.shard_map (jax >= 0.7, keyword check_vma) or the older experimental one (check_rep)."""
  fn = getattr(jax, "shard_map", None)
  if fn is not None:
    params = inspect.signature(fn).parameters
    check = "check_vma" if "check_vma" in params else "check_rep"
    return lambda f, mesh, in_specs, out_specs: fn(
        f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{check: False})
  from jax.experimental.shard_map import shard_map as old  # pylint: disable=import-outside-toplevel
  return lambda f, mesh, in_specs, out_specs: old(f, mesh, in_specs, out_specs, check_rep=False)


_SHARD_MAP = _shard_map_impl()


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
  """`jax.shard_map` on every supported jax, replication checks off (Pallas calls
  inside have no replication rules)."""
  return _SHARD_MAP(f, mesh, in_specs, out_specs)


def _auto_mesh(devices: np.ndarray, names) -> Mesh:
  """A Mesh whose axes are Auto (GSPMD propagates shardings; jax >= 0.9 defaults
  jax.make_mesh to Explicit)."""
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    return Mesh(devices, names)
  return Mesh(devices, names, axis_types=(axis_type.Auto,) * len(names))


# -------------------------------------------------------------------- mesh

def make_mesh(devices: Union[None, int, Sequence[Any]] = None, *, cfg: int = 1,
              sequence: Optional[int] = None) -> Mesh:
  """A Mesh with axes ("cfg", "seq") of sizes (cfg, sequence).

  devices: None (every device of `jax.devices()`), an int N (the first N), or a
    list of devices. cfg: devices along the batch rows, 1 or 2 (2 puts the
    conditional and unconditional passes of guidance on different devices).
    sequence: devices along the sequence (Ulysses degree); default
    len(devices) // cfg. cfg * sequence must equal the number of devices.
  """
  available = jax.devices()
  if devices is None:
    devices = available
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if not 1 <= devices <= len(available):
      raise ValueError(f"devices={devices}: must be in [1, {len(available)}] (jax.devices() "
                       f"has {len(available)} {available[0].platform} device(s))")
    devices = available[:int(devices)]
  else:
    devices = list(devices)
    if not devices:
      raise ValueError("devices must be None, a positive int or a non-empty list of devices")
  count = len(devices)
  if isinstance(cfg, bool) or cfg not in (1, 2):
    raise ValueError(f"cfg must be 1 or 2 (devices along the guidance rows), got {cfg!r}")
  if sequence is None:
    if count % cfg:
      raise ValueError(f"cfg={cfg} does not divide the {count} devices")
    sequence = count // cfg
  if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)) or sequence < 1:
    raise ValueError(f"sequence must be a positive int, got {sequence!r}")
  if cfg * sequence != count:
    raise ValueError(f"cfg * sequence = {cfg} * {sequence} = {cfg * sequence} must equal the "
                     f"number of devices, {count}")
  try:  # topology-aware device order where jax knows one (TPU rings)
    grid = jax.make_mesh((cfg, int(sequence)), AXES, devices=devices).devices
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices, dtype=object).reshape(cfg, int(sequence))
  return _auto_mesh(np.asarray(grid), AXES)


def allowed_degrees(heads: int) -> list[int]:
  """Sequence degrees that divide `heads` (Ulysses splits heads evenly)."""
  return [p for p in range(1, heads + 1) if heads % p == 0]


def _pad_axis(x, axis: int, size: int):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _take_heads(x, order):
  """x [b, s, H, D], order int32 [b, H]: x[:, :, order[b]] per row (a local gather)."""
  return jnp.take_along_axis(x, order[:, None, :, None], axis=2)


def _inverse(order):
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Parallel:
  """How one sampler is laid out over a mesh (hashable: static inside jit).

  mesh: a Mesh with axes ("cfg", "seq") (`make_mesh`).
  balance_heads: balance MOD's heads over the sequence devices by density.
  force_balance: adopt the greedy order even where it does not lower a layer's
    slowest device (to time or test the permutation).
  shard_weights: FSDP: split every weight of >= fsdp_min_bytes over all devices.
  """
  mesh: Mesh
  balance_heads: bool = True
  force_balance: bool = False
  shard_weights: bool = False
  fsdp_min_bytes: int = 1 << 20

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh (see modjax.sharding.make_mesh), "
                       f"got {type(self.mesh).__name__}")
    names = tuple(self.mesh.axis_names)
    if names != AXES:
      raise ValueError(f"the mesh's axes must be {AXES} (modjax.sharding.make_mesh), got {names}")

  @property
  def cfg(self) -> int:
    return int(self.mesh.shape[CFG])

  @property
  def seq(self) -> int:
    return int(self.mesh.shape[SEQ])

  @property
  def size(self) -> int:
    return self.cfg * self.seq

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def constrain(self, x, spec: P):
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.sharding(spec)), x)

  def check(self, *, heads: int, rows: Optional[int] = None, what: str = "the model") -> None:
    """ValueError when the mesh cannot split this attention problem (rows None: heads only)."""
    if heads % self.seq:
      raise ValueError(
          f"sequence degree {self.seq} does not divide the {heads} heads of {what}; allowed "
          f"sequence degrees: {allowed_degrees(heads)}")
    if rows is not None and rows % self.cfg:
      raise ValueError(
          f"cfg degree {self.cfg} does not divide the {rows} rows of the model batch (cfg=2 "
          f"needs classifier-free guidance, guidance_scale > 1, or an even batch)")

  # ---------------------------------------------------------- collectives

  def seq_to_heads(self, x):
    """[b, S/P, H, D] -> [b, S, H/P, D] (the Ulysses all-to-all)."""
    if self.seq == 1:
      return x
    return jax.lax.all_to_all(x, SEQ, 2, 1, tiled=True)

  def heads_to_seq(self, x):
    """[b, S, H/P, D] -> [b, S/P, H, D]."""
    if self.seq == 1:
      return x
    return jax.lax.all_to_all(x, SEQ, 1, 2, tiled=True)

  def padded(self, seq_len: int) -> int:
    return -(-seq_len // self.seq) * self.seq

  # ---------------------------------------------------------- attention

  def self_attention(self, attend, q, k, v, block_mask=None, head_order=None):
    """Ulysses self-attention. q, k, v [B, S, H, D] (global, sequence-sharded);
    attend(q, k, v, block_mask) -> (out, stats) runs on one device's whole
    sequences of H/P heads with those heads' block_mask ([b, H/P, ...] slices
    of a bool mask or BlockTable [B, H, ...]); stats leaves are [b, H/P, ...].
    head_order: int32 [B, H] (slot -> head) or None. Returns (out [B, S, H, D],
    stats [B, H, ...] in slot order)."""
    b, s, h, _ = q.shape
    self.check(heads=h, rows=b, what="this self-attention")
    s_pad = self.padded(s)
    q, k, v = (_pad_axis(x, 1, s_pad) for x in (q, k, v))
    args, specs = [q, k, v], [TOKENS] * 3
    has_mask = block_mask is not None
    if has_mask:
      args.append(_full_heads(block_mask, b, h))
      specs.append(HEADS)
    has_order = head_order is not None and self.seq > 1
    if has_order:
      args.append(jnp.broadcast_to(head_order.astype(jnp.int32), (b, h)))
      specs.append(ROWS)

    def body(q, k, v, *rest):
      rest = list(rest)
      mask = rest.pop(0) if has_mask else None
      order = rest.pop(0) if has_order else None
      if order is not None:
        q, k, v = (_take_heads(x, order) for x in (q, k, v))
      q, k, v = (self.seq_to_heads(x)[:, :s] for x in (q, k, v))
      out, stats = attend(q, k, v, mask)
      out = self.heads_to_seq(_pad_axis(out, 1, s_pad))
      if order is not None:
        out = _take_heads(out, _inverse(order))
      return out, stats

    out, stats = shard_map(body, mesh=self.mesh, in_specs=tuple(specs),
                           out_specs=(TOKENS, HEADS))(*args)
    return out[:, :s], stats

  def cross_attention(self, attend, q, k, v):
    """q [B, S, H, D] sequence-sharded, k, v [B, L, H, D] of the text: local on
    each device; attend(q, k, v) -> out."""
    s = q.shape[1]
    q = _pad_axis(q, 1, self.padded(s))
    out = shard_map(attend, mesh=self.mesh, in_specs=(TOKENS, ROWS, ROWS),
                    out_specs=TOKENS)(q, k, v)
    return out[:, :s]

  # ---------------------------------------------------------- weights

  def param_spec(self, leaf) -> P:
    """Replicated, or with shard_weights (weights of >= fsdp_min_bytes) split over
    every device when the mesh size divides the dim: a layer-stacked [L, ..., in,
    out] kernel along `in` (else `out`), a 2-D weight along its larger dim (never
    a leading layer axis of a stacked bias). GSPMD then gathers one layer's
    weight where a sequence-sharded activation meets it."""
    shape = tuple(getattr(leaf, "shape", ()))
    nbytes = math.prod(shape) * jnp.dtype(leaf.dtype).itemsize if shape else 0
    if not self.shard_weights or self.size == 1 or nbytes < self.fsdp_min_bytes:
      return REPLICATED
    ndim = len(shape)
    dims = (ndim - 2, ndim - 1) if ndim >= 3 else sorted(range(ndim), key=lambda d: -shape[d])
    for dim in dims:
      if shape[dim] % self.size == 0:
        spec = [None] * len(shape)
        spec[dim] = AXES
        return P(*spec)
    return REPLICATED

  def place_params(self, params):
    """Params on the mesh (replicated or FSDP), as `jax.device_put` places them."""
    return jax.tree.map(lambda a: jax.device_put(a, self.sharding(self.param_spec(a))), params)

  def params_constraint(self, params):
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, self.sharding(self.param_spec(a))), params)


def _full_heads(block_mask, batch: int, heads: int):
  """A block mask or BlockTable broadcast to full [batch, heads] leading dims."""
  from pallas_kernels import BlockTable  # pylint: disable=import-outside-toplevel
  if isinstance(block_mask, BlockTable):
    if tuple(block_mask.shape) == (batch, heads):
      return block_mask
    return block_mask.broadcast_to((batch, heads))
  if tuple(block_mask.shape[:2]) == (batch, heads):
    return block_mask
  return jnp.broadcast_to(block_mask, (batch, heads) + tuple(block_mask.shape[2:]))


def resolve(mesh: Union[None, Mesh, Parallel]) -> Parallel:
  """None -> the mesh of size 1 (first device); a Mesh -> Parallel(mesh)."""
  if mesh is None:
    return Parallel(make_mesh(1))
  if isinstance(mesh, Parallel):
    return mesh
  return Parallel(mesh)


# -------------------------------------------------------------- head balance

def _greedy(counts, groups: int):
  """counts [H] -> order [H] int32 (slot -> head): heads longest-first, each to the
  least loaded of `groups` devices with a free slot (H / groups slots each)."""
  h = counts.shape[-1]
  cap = h // groups
  counts = counts.astype(jnp.float32)
  heads = jnp.argsort(-counts, stable=True).astype(jnp.int32)

  def place(i, carry):
    loads, fill, order = carry
    head = heads[i]
    dev = jnp.argmin(jnp.where(fill < cap, loads, jnp.inf)).astype(jnp.int32)
    order = order.at[dev * cap + fill[dev]].set(head)
    return loads.at[dev].add(counts[head]), fill.at[dev].add(1), order

  init = (jnp.zeros((groups,), jnp.float32), jnp.zeros((groups,), jnp.int32),
          jnp.zeros((h,), jnp.int32))
  return jax.lax.fori_loop(0, h, place, init)[2]


def balanced_order(head_counts, *, cfg: int, seq: int):
  """The head order [L, B, H] (slot -> head) that balances active blocks.

  head_counts: [L, B, H] active blocks of each (layer, row, head) in natural
  head order. Rows of one cfg shard (B / cfg consecutive rows) share one order,
  chosen from their summed counts; each layer has its own.
  """
  lay, rows, h = head_counts.shape
  if h % seq or rows % cfg:
    raise ValueError(f"head_counts {head_counts.shape} cannot be split over cfg={cfg}, seq={seq}")
  per_shard = head_counts.reshape(lay, cfg, rows // cfg, h).sum(2)
  order = jax.vmap(jax.vmap(functools.partial(_greedy, groups=seq)))(per_shard)
  return jnp.repeat(order, rows // cfg, axis=1)


def device_work(slot_counts, *, cfg: int, seq: int):
  """[L, B, H] counts in slot order -> [L, cfg, seq] work of each device per layer."""
  lay, rows, h = slot_counts.shape
  return slot_counts.reshape(lay, cfg, rows // cfg, seq, h // seq).sum((2, 4))


def imbalance(slot_counts, *, cfg: int, seq: int):
  """max/mean per-device work (1 = perfect): the sequence devices of a row shard
  wait for each other at every layer (the all-to-all), the cfg shards at the end
  of the step, so the run takes max over cfg shards of sum over layers of the
  slowest device, against the mean device's sum."""
  w = device_work(jnp.asarray(slot_counts, jnp.float32), cfg=cfg, seq=seq)
  paced = jnp.max(jnp.sum(jnp.max(w, axis=2), axis=0))
  mean = jnp.sum(w) / (cfg * seq)
  return paced / jnp.maximum(mean, 1e-30)


def head_counts(mask):
  """Active blocks of each [L, B, H] slice of a bool block mask [L, B, H, n, n]."""
  return jnp.sum(mask, axis=(-2, -1), dtype=jnp.int32)


def head_imbalance(mask, par: Parallel, head_order=None) -> dict:
  """Imbalance of a mask [L, B, H, n, n] laid out by head_order (slot -> head,
  as `SampleOutput.state` / `.head_order`; None: natural order):
  {"natural": with heads in natural order, "balanced": in the given layout}."""
  slot = np.asarray(head_counts(jnp.asarray(mask)))
  kw = dict(cfg=par.cfg, seq=par.seq)
  laid_out = float(imbalance(slot, **kw))
  if head_order is None:
    return {"natural": laid_out, "balanced": laid_out}
  natural = np.take_along_axis(slot, np.argsort(np.asarray(head_order), axis=-1), axis=2)
  return {"natural": float(imbalance(natural, **kw)), "balanced": laid_out}


# -------------------------------------------------------------- the state

def state_specs(state, lead: tuple[int, int, int]):
  """PartitionSpecs of an attention-policy state: P(None, "cfg", "seq") for
  every leaf with leading dims [L, B, H] = lead (ValueError for any other leaf)."""
  def spec(leaf):
    if tuple(leaf.shape[:3]) != tuple(lead):
      raise ValueError(
          f"attention-policy state leaves must have leading dims [L, B, H] = {list(lead)} to "
          f"be sharded by head, got a leaf of shape {tuple(leaf.shape)}")
    return STATE
  return jax.tree.map(spec, state)


def _relayout(tree, sigma):
  """Leaf[:, :, j] <- leaf[:, :, sigma[..., j]] for every [L, B, H, ...] leaf."""
  def take(a):
    idx = sigma.reshape(sigma.shape + (1,) * (a.ndim - 3))
    return jnp.take_along_axis(a, idx, axis=2)
  return jax.tree.map(take, tree)


@struct.dataclass
class BalancedState:
  """A policy state laid out in head order: slot j of every inner leaf's head axis
  holds head order[..., j]. pending: the order adopted at the next map step."""
  inner: Any
  order: jax.Array      # int32 [L, B, H]
  pending: jax.Array    # int32 [L, B, H]


class MeshPolicy:
  """An attention policy run over a mesh: the inner policy's state sharded by
  head, its updates local (shard_map), and the controls carrying the mesh (and
  the head order with balancing). Same interface as the policies."""

  def __init__(self, policy, par: Parallel, step_kinds: Optional[np.ndarray] = None):
    from modjax.schedule import StepKind  # pylint: disable=import-outside-toplevel
    self.inner, self.par, self.geom = policy, par, policy.geom
    par.check(heads=policy.geom.heads, rows=policy.geom.batch)
    kinds = np.asarray(step_kinds) if step_kinds is not None else np.zeros((0,), np.int32)
    self.balancing = bool(par.balance_heads and par.seq > 1
                          and (kinds == StepKind.MAP).sum() >= 2)
    self._map = StepKind.MAP

  # passthrough
  def step_kinds(self, num_steps: int) -> np.ndarray:
    return self.inner.step_kinds(num_steps)

  def _specs(self, inner_state):
    return state_specs(inner_state, self.geom.lead)

  def _constrain(self, inner_state):
    if not jax.tree.leaves(inner_state):
      return inner_state
    specs = self._specs(inner_state)
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, self.par.sharding(s)),
                        inner_state, specs)

  def init(self):
    inner = self._local_init()
    if not self.balancing:
      return inner
    g = self.geom
    ident = jnp.broadcast_to(jnp.arange(g.heads, dtype=jnp.int32), g.lead)
    ident = self.par.constrain(ident, P(None, CFG))
    return BalancedState(inner=inner, order=ident, pending=ident)

  def control(self, state, kind):
    inner = state.inner if self.balancing else state
    control = self.inner.control(inner, kind)
    order = None
    if self.balancing and control.mode != "dense":
      order = state.pending if kind == self._map else state.order
    return control.replace(parallel=self.par, head_order=order)

  def _local_init(self):
    """The initial state, each device building its own heads' slice: the same policy
    on the local geometry (B / cfg rows, H / seq heads)."""
    state = jax.eval_shape(self.inner.init)
    if not jax.tree.leaves(state):
      return self.inner.init()
    g = self.geom
    local_geom = dataclasses.replace(g, batch=g.batch // self.par.cfg, heads=g.heads // self.par.seq)
    local = type(self.inner)(self.inner.config, local_geom)
    return shard_map(local.init, mesh=self.par.mesh, in_specs=(),
                     out_specs=self._specs(state))()

  def _local_update(self, inner, stats, kind):
    if not jax.tree.leaves(inner):
      return self.inner.update(inner, stats, kind)
    specs = self._specs(inner)
    stats_specs = state_specs(stats, self.geom.lead)
    fn = lambda st, ss: self.inner.update(st, ss, kind)
    return shard_map(fn, mesh=self.par.mesh, in_specs=(specs, stats_specs),
                     out_specs=specs)(inner, stats)

  def update(self, state, stats, kind):
    if not self.balancing:
      return self._local_update(state, stats, kind)
    inner, order, pending = state.inner, state.order, state.pending
    if kind == self._map:
      # This step's attention ran in `pending` order: lay the history out in it.
      # A map update reads only the previous fit (x_cur) of that history; XLA
      # drops the re-layout of every other leaf.
      sigma = jnp.take_along_axis(_inverse(order), pending, axis=-1)
      inner = self._constrain(_relayout(inner, sigma))
      order = pending
    inner = self._local_update(inner, stats, kind)
    if kind == self._map:
      counts = _relayout(head_counts(inner.mask), _inverse(order))   # natural head order
      pending = self.par.constrain(self._next_order(counts, order), P(None, CFG))
    return BalancedState(inner=inner, order=order, pending=pending)

  def _next_order(self, counts, order):
    """The balanced order where it lowers a layer's slowest device, else `order`."""
    kw = dict(cfg=self.par.cfg, seq=self.par.seq)
    candidate = balanced_order(counts, **kw)
    if self.par.force_balance:
      return candidate
    slowest = lambda o: device_work(jnp.take_along_axis(counts, o, axis=2), **kw).max(-1)
    better = jnp.repeat(slowest(candidate) < slowest(order), counts.shape[1] // self.par.cfg,
                        axis=1)                                  # [L, B]
    return jnp.where(better[..., None], candidate, order)

  def density(self, state, kind):
    return self.inner.density(state.inner if self.balancing else state, kind)

  def output(self, state):
    """(the inner state as it lies on the mesh, in slot order; the head order
    [L, B, H] or None). `to_natural_order` re-lays it (an all-gather)."""
    if not self.balancing:
      return state, None
    return state.inner, state.order


def to_natural_order(state, head_order):
  """A state in slot order (`SampleOutput.state` under head balancing) in natural
  head order: leaf[:, :, h] of the result is head h. Moves the state across
  devices (GSPMD gathers it): for inspection after sampling."""
  if head_order is None:
    return state
  return _relayout(state, _inverse(jnp.asarray(head_order)))
