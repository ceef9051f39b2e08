"""Fidelity to the authors' code (pkumelon/MOD-DiT, ALGORITHM.md section 9).

The authors' behaviour is written out here in numpy, as a statement of their
rules (`authors_*` below), and the real `MODPolicy` update path is checked
against it:
  * their fit returns zeros at step W-2, so the first mask ranks X(W-1) (1 + 1/T):
    no extrapolation (first_mask="last_map");
  * the map history and the map the fit reads are float16 (history_dtype);
  * block-diagonal heads also get the trailing partial frame group in the mask,
    which their fit leaves out of E (tail_block_diagonal).
Our diagonal guard (block (i, i) always kept) is added on top of their mask.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from modjax import config as C
from modjax import features as F
from modjax import policies
from modjax.schedule import StepKind


# ---------------------------------------------------------------- the authors' rules

def authors_fit(s, bpf, ridge=1.0):
  """Their features of a map s [..., n, n]: ridge least squares on the 2n-1 diagonals,
  the n columns and the *full* frame blocks (float64 here), columns halved."""
  n = s.shape[-1]
  m = F.design_matrix(n, bpf)
  lhs = m.T @ m + ridge * np.eye(3 * n)
  x = np.linalg.solve(lhs, m.T @ s.reshape(-1, n * n).astype(np.float64).T).T
  x = x.reshape(s.shape[:-2] + (3 * n,))
  return dict(d=x[..., :2 * n - 1], c=x[..., 2 * n - 1:3 * n - 1] / 2, b_d=x[..., -1])


def authors_zero_features(shape, n):
  return dict(d=np.zeros(shape + (2 * n - 1,)), c=np.zeros(shape + (n,)), b_d=np.zeros(shape))


def authors_mask(last, current, block_diagonal, *, top_k, interval, bpf):
  """choose_topk_lines + generate_mask_from_lines: predict X + (X - X_last) / T on the
  concatenation (halved columns, diagonals), keep the top_k smallest (lower index
  first on ties), draw the lines, and for block-diagonal heads every (i, j) with
  i // bpf == j // bpf -- the trailing partial group included."""
  pred_c = current["c"] + (current["c"] - last["c"]) / interval
  pred_d = current["d"] + (current["d"] - last["d"]) / interval
  values = np.concatenate([pred_c, pred_d], axis=-1)
  n = pred_c.shape[-1]
  lead = values.shape[:-1]
  values = values.reshape(-1, 3 * n - 1)
  bd = np.broadcast_to(block_diagonal, lead).reshape(-1)
  group = np.arange(n) // bpf
  out = np.zeros((values.shape[0], n, n), bool)
  for h, v in enumerate(values):
    for line in np.lexsort((np.arange(3 * n - 1), v))[:top_k]:
      if line < n:
        out[h, :, line] = True
      else:
        out[h] |= np.eye(n, k=int(line - (n - 1) - n), dtype=bool)
    if bd[h]:
      out[h] |= group[:, None] == group[None, :]
  return out.reshape(lead + (n, n))


def authors_run(maps, *, warmup, interval, top_k, bpf, e_max=1.0):
  """Their state machine over steps, for maps[step] [..., n, n]: returns the mask
  built at each map / refresh step, {step: bool [..., n, n]}."""
  first = maps[min(maps)]
  lead, n = first.shape[:-2], first.shape[-1]
  f16 = lambda s: np.asarray(s, np.float16).astype(np.float32)
  history, prev_full, mask, mode, masks = [], None, None, None, {}
  for step in sorted(maps):
    if step == warmup - 2:                       # fit returns zeros before step W-1
      history, prev_full = [authors_zero_features(lead, n)], f16(maps[step])
      continue                                   # no mask yet
    if step == warmup - 1:
      prev_full = f16(maps[step])
      history.append(authors_fit(prev_full, bpf))
      mode = history[-1]["b_d"] <= e_max          # check_bd_values(threshold=1)
      mask = authors_mask(history[-2], history[-1], mode, top_k=top_k, interval=interval, bpf=bpf)
    elif step >= warmup and (step - warmup) % interval == interval - 1:
      prev_full = np.where(mask, f16(maps[step]), prev_full)
      history = [history[-1], authors_fit(prev_full, bpf)]
      mask = authors_mask(history[-2], history[-1], mode, top_k=top_k, interval=interval, bpf=bpf)
    else:
      continue
    masks[step] = mask | np.eye(n, dtype=bool)    # our guard on top
  return masks


# ---------------------------------------------------------------- the policy path

def _geometry(n, bpf, *, layers=1, batch=1, heads=1, block=64, seq_len=None):
  return policies.Geometry(num_layers=layers, batch=batch, heads=heads,
                           seq_len=seq_len or n * block, tokens_per_frame=bpf * block,
                           block_size=block)


def policy_run(config, geom, maps, num_steps):
  """Every step through the policy: step kinds, update with that step's map."""
  policy = policies.MODPolicy(config, geom)
  state = policy.init()
  out = {}
  for step, kind in enumerate(policy.step_kinds(num_steps)):
    kind = StepKind(int(kind))
    stats = {"sparsity_map": jnp.asarray(maps[step], jnp.float32)} if step in maps else {}
    if kind in (StepKind.MAP, StepKind.REFRESH):
      state = policy.update(state, stats, kind)
      out[step] = np.asarray(state.mask)
  return out, state, policy


def _column_maps(n, lead, cols_prev, cols_cur, base=1.0):
  """Maps equal to `base` except the given columns {j: value}."""
  prev = np.full(lead + (n, n), base, np.float32)
  cur = prev.copy()
  for j, v in cols_prev.items():
    prev[..., :, j] = v
  for j, v in cols_cur.items():
    cur[..., :, j] = v
  return prev, cur


def test_first_mask_last_map_ranks_x_w1_alone():
  """Column 1 is the more important at step W-1 (0.50 < 0.60) but fading (0.30 ->
  0.50); column 2 is rising (0.90 -> 0.60). Their first mask keeps column 1 (X(W-1)
  alone); extrapolating over T = 1 keeps column 2."""
  n, bpf, w, t = 6, 2, 4, 1
  prev, cur = _column_maps(n, (1, 1, 1), {1: 0.30, 2: 0.90}, {1: 0.50, 2: 0.60})
  maps = {w - 2: prev, w - 1: cur}
  common = dict(block_size=64, warmup_steps=w, interval=t, top_k=1, refresh="none")
  ref, _, policy = policy_run(C.MODConfig.reference(**common), _geometry(n, bpf), maps, w + 1)
  ours, _, _ = policy_run(C.MODConfig(**common), _geometry(n, bpf), maps, w + 1)
  want = authors_run(maps, warmup=w, interval=t, top_k=1, bpf=bpf)[w - 1]
  np.testing.assert_array_equal(ref[w - 1], want)
  assert want[0, 0, 0, :, 1].all() and not want[0, 0, 0, :, 2].all()
  assert ours[w - 1][0, 0, 0, :, 2].all() and not ours[w - 1][0, 0, 0, :, 1].all()
  # the map of step W-2 is never used, so that step runs plain dense
  assert policy.step_kinds(w + 1)[w - 2] == StepKind.DENSE
  assert list(policies.MODPolicy(C.MODConfig(**common), _geometry(n, bpf)).step_kinds(w + 1)[
      w - 2:w]) == [StepKind.MAP, StepKind.MAP]


@pytest.mark.parametrize("history_dtype", ["float16", "float32", "bfloat16"])
def test_history_precision_decides_a_near_tie(history_dtype):
  """Columns 1 (0.5010) and 4 (0.5000) of n = 6, bpf = 2: mirror images under the
  flip (i, j) -> (n-1-i, n-1-j), which maps the design onto itself, so only the
  stored values decide between them. float16 (the authors' storage) and float32
  keep them apart and column 4 wins; bfloat16 rounds both to 0.5 (a tie left to
  rounding noise)."""
  n, bpf, w = 6, 2, 2
  _, cur = _column_maps(n, (1, 1, 1), {}, {1: 0.5010, 4: 0.5000})
  maps = {w - 1: cur}
  cfg = C.MODConfig.reference(block_size=64, warmup_steps=w, interval=1, top_k=1,
                              history_dtype=history_dtype)
  masks, state, _ = policy_run(cfg, _geometry(n, bpf), maps, w)
  assert state.prev_map.dtype == jnp.dtype(history_dtype)
  stored = np.asarray(state.prev_map, np.float32)[0, 0, 0, 0]
  np.testing.assert_array_equal(stored, np.asarray(jnp.asarray(cur[0, 0, 0, 0], history_dtype), np.float32))
  if history_dtype == "bfloat16":
    assert stored[1] == stored[4] == 0.5
    return
  mask = masks[w - 1][0, 0, 0]
  assert mask[:, 4].all() and not mask[:, 1].all()
  if history_dtype == "float16":
    np.testing.assert_array_equal(
        masks[w - 1], authors_run({w - 2: cur, **maps}, warmup=w, interval=1, top_k=1, bpf=bpf)[w - 1])


@pytest.mark.parametrize("n,bpf", [(5, 3), (8, 3), (7, 4)])
def test_tail_block_diagonal_adds_the_partial_group(n, bpf):
  """n not a multiple of bpf: with tail_block_diagonal the last, partial group of
  blocks [n // bpf * bpf, n) is a block-diagonal square of the mask (their mask),
  without it only full frame blocks are; the fit (E) never includes the tail."""
  rng = np.random.default_rng(n * 10 + bpf)
  s = rng.uniform(0.2, 1.0, size=(1, 1, 1, n, n)).astype(np.float32)
  cfg = dict(block_size=64, warmup_steps=2, interval=1, top_k=1, e_max=1e9)  # all heads bd
  with_tail, st_a, _ = policy_run(C.MODConfig(tail_block_diagonal=True, **cfg),
                                  _geometry(n, bpf), {0: s, 1: s}, 2)
  without, st_b, _ = policy_run(C.MODConfig(**cfg), _geometry(n, bpf), {0: s, 1: s}, 2)
  np.testing.assert_array_equal(np.asarray(st_a.x_cur.to_vector()), np.asarray(st_b.x_cur.to_vector()))
  tail = np.arange(n) >= (n // bpf) * bpf
  square = tail[:, None] & tail[None, :]
  full = F.frame_block_mask(n, bpf)
  a, b = with_tail[1][0, 0, 0], without[1][0, 0, 0]
  assert a[square].all() and a[full].all() and b[full].all()
  np.testing.assert_array_equal(a & ~square, b & ~square)
  assert (square & ~b).any()  # the option changes the mask here
  np.testing.assert_array_equal(F.frame_block_mask(n, bpf, include_tail=True), full | square)


@pytest.mark.parametrize("refresh_steps", [1, 2])
def test_reference_preset_reproduces_their_state_machine(refresh_steps):
  """MODConfig.reference() (shortened schedule) over a whole run of random maps,
  2 layers x 2 CFG rows x 2 heads, n = 8 blocks with bpf = 3 (a partial tail group):
  every mask equals the authors' (zero W-2 features, float16 history merged where
  the mask was active, tail group in the block-diagonal mask) plus our guard."""
  n, bpf, w, t, k = 8, 3, 5, 3, 5
  steps = w + refresh_steps * t
  lead = (2, 2, 2)
  rng = np.random.default_rng(refresh_steps)
  maps = {}
  for step in range(steps):
    base = rng.uniform(0.3, 1.0, size=lead + (n, n))
    base[..., rng.integers(n)] *= 0.3               # an important column
    base *= 1.0 - 0.5 * np.eye(n, k=int(rng.integers(-2, 3)))  # and a diagonal
    maps[step] = base.astype(np.float32)
  cfg = C.MODConfig.reference(block_size=64, warmup_steps=w, interval=t, top_k=k)
  assert (cfg.first_mask, cfg.history_dtype, cfg.tail_block_diagonal) == ("last_map", "float16", True)
  got, state, _ = policy_run(cfg, _geometry(n, bpf, layers=2, batch=2, heads=2), maps, steps)
  want = authors_run(maps, warmup=w, interval=t, top_k=k, bpf=bpf)
  assert sorted(got) == sorted(want) and len(got) == 1 + refresh_steps
  for step in want:
    np.testing.assert_array_equal(got[step], want[step], err_msg=f"step {step}")
  assert state.prev_map.dtype == jnp.float16
  assert 0.2 < np.mean(got[w - 1]) < 0.9  # neither empty nor dense


def test_reference_defaults_and_run_wan_setting():
  ref = C.MODConfig.reference()
  assert (ref.top_k, ref.warmup_steps, ref.interval, ref.threshold, ref.ridge, ref.e_max,
          ref.refresh, ref.dense_layers, ref.block_size) == (350, 12, 10, 1e-4, 1.0, 1.0, "dense", 0, 128)
  run_wan = C.MODConfig.reference(**C.RUN_WAN_SH)
  assert (run_wan.top_k, run_wan.warmup_steps, run_wan.interval, run_wan.dense_layers) == (80, 10, 15, 1)
  assert run_wan.first_mask == "last_map"
  ours = C.MODConfig()
  assert (ours.first_mask, ours.history_dtype, ours.tail_block_diagonal) == ("extrapolate", "float16", False)
  assert dataclasses.replace(ref, top_k=0.1).top_k == 0.1


def test_dense_layers_one_runs_layer_zero_dense():
  n, bpf = 6, 2
  s = np.random.default_rng(3).uniform(0.2, 1, size=(2, 1, 1, n, n)).astype(np.float32)
  masks, _, _ = policy_run(C.MODConfig.reference(block_size=64, warmup_steps=2, interval=1, top_k=2,
                                                 dense_layers=1),
                           _geometry(n, bpf, layers=2), {1: s}, 2)
  assert masks[1][0].all() and not masks[1][1].all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(first_mask="zeros"), "first_mask must be one of"),
    (dict(history_dtype="float64"), "history_dtype must be one of"),
    (dict(history_dtype=jnp.float16), "history_dtype must be one of"),
    (dict(tail_block_diagonal=1), "tail_block_diagonal must be a bool"),
])
def test_bad_fidelity_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    C.MODConfig(**kwargs)
  with pytest.raises(ValueError, match=match):
    C.MODConfig.reference(**kwargs)
