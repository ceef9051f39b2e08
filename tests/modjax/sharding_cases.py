"""The sharded sampler on 8 virtual CPU devices, against one device (run by test_sharding.py).

Run as a script in a fresh process: the device count must be set before JAX
starts its backend. Prints one JSON object per case on stdout, a line each
starting with "CASE ". test_sharding.py asserts on them.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    # LLVM at -O0: compiles 3-4x faster on CPU; every comparison is within this process
    "--xla_backend_optimization_level=0"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import modjax  # noqa: E402
import pallas_kernels  # noqa: E402
from models import wan  # noqa: E402
from modjax import sharding  # noqa: E402
from modjax.control import AttentionControl  # noqa: E402

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 5, 18, 18, 8   # 5 frames of 9 x 9 = 405 tokens (odd)
STEPS = 6
# steps: dense, map, map, sparse, refresh (sparse_map: the table and the map pass), sparse
MOD = modjax.MODConfig(block_size=64, warmup_steps=3, interval=2, top_k=4, refresh="sparse",
                       implementation="xla")
DENSE = modjax.DenseConfig(implementation="xla")
CONFIG = wan.WanConfig.tiny(num_heads=4)
SEQ_LEN = CONFIG.tokens(FRAMES, HEIGHT, WIDTH)


def emit(name, **result):
  print("CASE " + json.dumps(dict(name=name, **result)), flush=True)


def settings(attention, guidance=4.0):
  return modjax.SamplerSettings(frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                                guidance_scale=guidance, shift=3.0, attention=attention)


PARAMS = wan.init_params(CONFIG, jax.random.key(0), FRAMES, HEIGHT, WIDTH, TEXT_LEN)
FAMILY = wan.WanFamily(CONFIG)


def inputs(seed):
  kc, kn, kx = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kc, (1, TEXT_LEN, CONFIG.text_dim)),
          jax.random.normal(kn, (1, TEXT_LEN, CONFIG.text_dim)), kx)


def placed(par, seed):
  rep = par.sharding(sharding.REPLICATED)
  return (par.place_params(PARAMS),) + tuple(jax.device_put(inputs(seed), rep))


def head_sharded(leaf, par) -> bool:
  """Each device holds exactly its [L, B/cfg rows, H/seq heads] block of the leaf."""
  lay, rows, heads = leaf.shape[:3]
  where = {d.id: idx for idx, d in np.ndenumerate(par.mesh.devices)}
  shards = leaf.addressable_shards
  if len(shards) != par.size:
    return False
  for shard in shards:
    i, j = where[shard.device.id]
    index = [s.indices(n) for s, n in zip(shard.index, leaf.shape)]
    want = [(0, lay, 1), (i * rows // par.cfg, (i + 1) * rows // par.cfg, 1),
            (j * heads // par.seq, (j + 1) * heads // par.seq, 1)]
    want += [(0, n, 1) for n in leaf.shape[3:]]
    if index != want:
      return False
  return True


_COLL = re.compile(r" = (.*?) (all-gather|all-to-all|all-reduce|collective-permute|"
                   r"reduce-scatter)(?:-start)?\(")


def collectives(text):
  """[{op, shape (of the first result), where (op_name)}] of the compiled HLO."""
  out = []
  for line in text.splitlines():
    m = _COLL.search(line)
    if not m:
      continue
    dims = re.search(r"[a-z0-9]+\[([0-9,]*)\]", m.group(1)).group(1)
    name = re.search(r'op_name="([^"]*)"', line)
    out.append(dict(op=m.group(2), shape=[int(x) for x in dims.split(",") if x],
                    where=name.group(1) if name else ""))
  return out


def hlo_report(compiled, par, rows):
  """What the compiled sampler communicates and how the FFN is laid out."""
  text = compiled.as_text()
  colls = collectives(text)
  act = SEQ_LEN * CONFIG.dim
  activation = [c for c in colls if c["op"] != "all-to-all" and int(np.prod(c["shape"])) >= act]
  # state-shaped: [L, B(/cfg), H(/seq), n, n | w] masks, maps, tables, inside the loop
  in_loop = [c for c in colls if "while/body" in c["where"] and c["op"] != "all-to-all"]
  big_state = [c for c in in_loop if len(c["shape"]) >= 5 and c["shape"][0] == CONFIG.num_layers]
  small_state_branches = sorted({re.search(r"branch_(\d+)_fun", c["where"]).group(1)
                                 for c in in_loop if len(c["shape"]) == 4
                                 and c["shape"][0] == CONFIG.num_layers
                                 and "branch_" in c["where"]})
  ffn = []
  for line in text.splitlines():
    if "ffn/proj_in/dot_general" in line and " dot(" in line:
      ffn.append([int(x) for x in re.search(r"= [a-z0-9]+\[([0-9,]*)\]", line).group(1).split(",")])
  return dict(activation_collectives=activation, big_state_collectives=big_state,
              small_state_branches=small_state_branches,
              all_to_all=sum(c["op"] == "all-to-all" for c in colls),
              ffn_dot_shapes=ffn,
              ffn_local_tokens=rows // par.cfg * (-(-SEQ_LEN // par.seq)))


def run_sampler(attention, par, *, hlo=False):
  chex.clear_trace_counter()  # one counter per call site: each sampler starts at 0
  traced = chex.assert_max_traces(modjax.sample_fn(FAMILY, settings(attention), mesh=par), n=1)
  fn = jax.jit(traced)
  args = placed(par, 1)
  report = hlo_report(fn.lower(*args).compile(), par, rows=2) if hlo else None
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out.latents)
  elapsed = time.perf_counter() - t0
  second = fn(*placed(par, 2))  # other inputs: must not trace again
  jax.block_until_ready(second.latents)
  return out, second, report, elapsed


def main():
  t_start = time.perf_counter()
  refs = {}
  one = sharding.resolve(None)
  for name, att in (("dense", DENSE), ("mod", MOD)):
    refs[name] = run_sampler(att, one)
  emit("reference", seq_len=SEQ_LEN, one_device_spec=str(refs["mod"][0].state.mask.sharding),
       seconds=time.perf_counter() - t_start)

  outs = {}
  for name, att in (("dense", DENSE), ("mod", MOD)):
    ref, ref2 = refs[name][:2]
    for cfg, seq in ((1, 2), (2, 2), (1, 4), (2, 4)):
      case = f"{name}_cfg{cfg}_seq{seq}"
      t0 = time.perf_counter()
      try:
        par = sharding.Parallel(sharding.make_mesh(cfg * seq, cfg=cfg))
        out, second, report, _ = run_sampler(att, par, hlo=(name == "mod" and (cfg, seq) == (2, 2)))
        outs[case] = out
        result = dict(
            err=float(np.abs(np.asarray(out.latents) - np.asarray(ref.latents)).max()),
            err_second=float(np.abs(np.asarray(second.latents) - np.asarray(ref2.latents)).max()),
            scale=float(np.abs(np.asarray(ref.latents)).max()),
            density_equal=bool(np.array_equal(np.asarray(out.density), np.asarray(ref.density))),
            latents_replicated=bool(out.latents.sharding.is_fully_replicated),
            hlo=report)
        if name == "mod":
          leaves = jax.tree.leaves(out.state)
          natural = sharding.to_natural_order(out.state, out.head_order)
          result.update(
              state_leaves=len(leaves),
              state_head_sharded=all(head_sharded(x, par) for x in leaves),
              mask_equal=bool(np.array_equal(np.asarray(natural.mask),
                                             np.asarray(ref.state.mask))),
              prev_map_err=float(np.abs(np.asarray(natural.prev_map, np.float32)
                                        - np.asarray(ref.state.prev_map, np.float32)).max()),
              head_order=None if out.head_order is None else np.asarray(out.head_order).tolist(),
              imbalance=sharding.head_imbalance(out.state.mask, par, out.head_order))
        emit(case, ok=True, seconds=time.perf_counter() - t0, **result)
      except Exception:  # pylint: disable=broad-except
        emit(case, ok=False, error=traceback.format_exc()[-3000:])

  # the same run without head balancing, and with FSDP weights
  for case, att, par_kw, cfg, seq in (("mod_unbalanced_cfg1_seq2", MOD, dict(balance_heads=False), 1, 2),
                                      ("mod_forced_balance_cfg1_seq2", MOD, dict(force_balance=True),
                                       1, 2),
                                      ("dense_fsdp_cfg2_seq2", DENSE,
                                       dict(shard_weights=True, fsdp_min_bytes=1024), 2, 2)):
    t0 = time.perf_counter()
    try:
      par = sharding.Parallel(sharding.make_mesh(cfg * seq, cfg=cfg), **par_kw)
      out = run_sampler(att, par)[0]
      ref = refs["mod" if att is MOD else "dense"][0]
      balanced = None
      if att is MOD:
        b_out = outs[f"mod_cfg{cfg}_seq{seq}"]   # the same mesh, default balancing
        natural = sharding.to_natural_order(out.state, out.head_order)
        balanced = dict(
            err=float(np.abs(np.asarray(out.latents) - np.asarray(b_out.latents)).max()),
            mask_equal=bool(np.array_equal(np.asarray(natural.mask), np.asarray(ref.state.mask))),
            head_order=None if out.head_order is None else np.asarray(out.head_order).tolist(),
            state_head_sharded=all(head_sharded(x, par) for x in jax.tree.leaves(out.state)))
      sharded_params = sum(not par.param_spec(x) == sharding.REPLICATED
                           for x in jax.tree.leaves(PARAMS))
      emit(case, ok=True, seconds=time.perf_counter() - t0,
           err=float(np.abs(np.asarray(out.latents) - np.asarray(ref.latents)).max()),
           balanced=balanced, sharded_params=sharded_params,
           params=len(jax.tree.leaves(PARAMS)))
    except Exception:  # pylint: disable=broad-except
      emit(case, ok=False, error=traceback.format_exc()[-3000:])

  t0 = time.perf_counter()
  try:
    emit("cogvideox_cfg1_seq2", ok=True, **joint_family(), seconds=time.perf_counter() - t0)
  except Exception:  # pylint: disable=broad-except
    emit("cogvideox_cfg1_seq2", ok=False, error=traceback.format_exc()[-3000:])

  t0 = time.perf_counter()
  try:
    emit("wan_pipeline_cfg2_seq2", ok=True, **pipeline_on_a_mesh(), seconds=time.perf_counter() - t0)
  except Exception:  # pylint: disable=broad-except
    emit("wan_pipeline_cfg2_seq2", ok=False, error=traceback.format_exc()[-3000:])

  t0 = time.perf_counter()
  try:
    emit("skewed_heads", ok=True, **skewed_heads(), seconds=time.perf_counter() - t0)
  except Exception:  # pylint: disable=broad-except
    emit("skewed_heads", ok=False, error=traceback.format_exc()[-3000:])

  errors = {}
  for label, fn in (
      ("degree", lambda: modjax.sample_fn(FAMILY, settings(DENSE), mesh=sharding.make_mesh(3))),
      ("no_guidance", lambda: jax.eval_shape(
          modjax.sample_fn(FAMILY, settings(DENSE, guidance=1.0),
                           mesh=sharding.make_mesh(4, cfg=2)), PARAMS, *inputs(1))),
      ("mesh_shape", lambda: sharding.make_mesh(8, cfg=2, sequence=3)),
      ("too_many", lambda: sharding.make_mesh(9)),
      ("axes", lambda: sharding.Parallel(jax.make_mesh((8,), ("x",))))):
    try:
      fn()
      errors[label] = None
    except ValueError as e:
      errors[label] = str(e)
  emit("errors", ok=True, **errors)
  emit("total", seconds=time.perf_counter() - t_start)


def joint_family():
  """Another family, joint self-attention over [text; video] (CogVideoX, 2 heads): 5 text
  + 162 video tokens (odd, off the block grid) on seq=2, dense and MOD (the text blocks
  always computed, the MOD state on the video blocks only)."""
  from models import cogvideox  # pylint: disable=import-outside-toplevel
  from models.cogvideox import CogVideoXConfig, CogVideoXFamily  # pylint: disable=import-outside-toplevel
  config = CogVideoXConfig.tiny()
  family = CogVideoXFamily(config, text_len=5)
  frames, height, width = 3, 12, 18
  layout = family.attention_layout(frames, height, width)
  params = cogvideox.init_params(config, jax.random.key(0), frames, height, width, 5)
  kc, kn, kx = jax.random.split(jax.random.key(4), 3)
  ctx = jax.random.normal(kc, (1, 5, config.text_dim))
  neg = jax.random.normal(kn, (1, 5, config.text_dim))
  mod = modjax.MODConfig(block_size=64, warmup_steps=2, interval=2, top_k=1, refresh="sparse",
                         implementation="xla")
  result = dict(seq_len=layout.seq_len)
  for name, attention in (("dense", DENSE), ("mod", mod)):
    st = modjax.SamplerSettings(frames=frames, height=height, width=width, num_inference_steps=4,
                                guidance_scale=4.0, attention=attention)
    ref = jax.jit(modjax.sample_fn(family, st))(params, ctx, neg, kx)
    par = sharding.Parallel(sharding.make_mesh(2))
    rep = par.sharding(sharding.REPLICATED)
    out = jax.jit(modjax.sample_fn(family, st, mesh=par))(
        par.place_params(params), *jax.device_put((ctx, neg, kx), rep))
    result[name] = dict(err=float(np.abs(np.asarray(out.latents) - np.asarray(ref.latents)).max()),
                        scale=float(np.abs(np.asarray(ref.latents)).max()),
                        sparsity=modjax.sparsity(out))
  return result


def pipeline_on_a_mesh():
  """WanPipeline (the tiny diffusers-written folder, UMT5 + VAE + UniPC) with mesh= at
  from_pretrained and per call: the same frames as one device."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from tests.pipelines.tiny_wan import tiny_wan_folder  # pylint: disable=import-outside-toplevel
  folder = tiny_wan_folder(tempfile.mkdtemp(prefix="wan-mesh-"))
  kw = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=3.0)
  one = modjax.WanPipeline.from_pretrained(folder)
  ref = one("a cat", **kw)
  mesh = sharding.make_mesh(4, cfg=2)
  on_mesh = modjax.WanPipeline.from_pretrained(folder, mesh=mesh)
  out = on_mesh("a cat", **kw)
  per_call = one("a cat", mesh=mesh, **kw)
  params_on_mesh = all(len(x.sharding.device_set) == 4
                       for x in jax.tree.leaves(on_mesh.transformer_params))
  diff = lambda o: dict(latents=float(np.abs(o.latents - ref.latents).max()),
                        frames=int(np.abs(o.frames.astype(int) - ref.frames).max()))
  return dict(at_load=diff(out), per_call=diff(per_call), params_on_mesh=params_on_mesh,
              frames_shape=list(out.frames.shape))


def skewed_heads():
  """8 heads on 4 sequence devices, heads 0-3 dense and 4-7 diagonal only: the
  balanced order pairs one dense with one sparse head per device; outputs and
  maps equal the one-device kernel in either layout."""
  b, s, h, d = 1, SEQ_LEN, 8, 16
  n = -(-s // 64)
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q, k, v = (jax.random.normal(key, (b, s, h, d), jnp.float32) for key in (kq, kk, kv))
  dense_heads = np.arange(h) < 4
  mask = np.where(dense_heads[None, :, None, None], True, np.eye(n, dtype=bool))
  mask = jnp.asarray(np.broadcast_to(mask, (b, h, n, n)))
  par = sharding.Parallel(sharding.make_mesh(4, cfg=1))
  counts = sharding.head_counts(mask[None])                         # [1, B, H]
  order = sharding.balanced_order(counts, cfg=1, seq=4)             # [1, B, H]
  slot_mask = jnp.take_along_axis(mask, order[0][:, :, None, None], axis=1)
  natural_imb = float(sharding.imbalance(counts, cfg=1, seq=4))
  balanced_imb = float(sharding.imbalance(jnp.take_along_axis(counts, order, axis=2), cfg=1, seq=4))
  work = lambda c: np.asarray(sharding.device_work(c, cfg=1, seq=4)).max()

  ref_out, ref_map = pallas_kernels.block_sparse_attention_with_map(
      q, k, v, mask, block_size=64, implementation="xla")
  results = {}
  for label, table_mask, head_order in (("natural", mask, None), ("balanced", slot_mask, order[0])):
    table = pallas_kernels.compact_block_mask(table_mask)
    control = AttentionControl(mode="sparse_map", block_mask=table, sparse_implementation="xla",
                               block_size=64, head_order=head_order, parallel=par)
    out, stats = jax.jit(lambda c, q, k, v: c.self_attention(q, k, v))(control, q, k, v)
    smap = stats["sparsity_map"]
    if head_order is not None:   # slot order -> natural order
      smap = jnp.take_along_axis(smap, jnp.argsort(head_order, axis=-1)[:, :, None, None], axis=1)
    finite = np.isfinite(np.asarray(ref_map))
    results[label] = dict(
        out_err=float(jnp.abs(out - ref_out).max()),
        map_err=float(np.abs(np.asarray(smap)[finite] - np.asarray(ref_map)[finite]).max()),
        map_nan_equal=bool((np.isfinite(np.asarray(smap)) == finite).all()))
  return dict(natural_imbalance=natural_imb, balanced_imbalance=balanced_imb,
              natural_max_work=float(work(counts)),
              balanced_max_work=float(work(jnp.take_along_axis(counts, order, axis=2))),
              order=np.asarray(order[0, 0]).tolist(), attention=results)


if __name__ == "__main__":
  main()
