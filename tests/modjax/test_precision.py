"""Kernel precision in the attention configs: sparse steps and dense steps apart.

The quantized modes run our kernel (block-sparse steps, and dense steps in the
kernel's dense mode); on CPU the XLA backend computes them in reference form, so
these tests pin the plumbing: which steps are quantized, with which precision,
and that everything else is untouched.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modjax
import pallas_kernels
from models import wan
from modjax.control import AttentionControl
from tests.modjax import test_sampler as ts


def _qkv(seed, b=1, s=300, h=2, d=64, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.float32).astype(dtype) for x in (kq, kk, kv))
  # outliers: a few keys 20x larger, as real models have (smoothing must handle them)
  k = k.at[:, 7].multiply(20.0).at[:, 123].multiply(20.0)
  return q, k, v


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("config", [modjax.MODConfig, modjax.StaticMaskConfig, modjax.OracleConfig])
def test_precision_fields_are_validated(config):
  with pytest.raises(ValueError, match=r"precision must be one of .*'int8_fp8'.*got 'int4'"):
    config(precision="int4")
  with pytest.raises(ValueError, match=r"dense_precision must be one of"):
    config(dense_precision="fp16")
  with pytest.raises(ValueError, match=r"dense_implementation must be None, got 'cudnn'"):
    config(dense_precision="fp8", dense_implementation="cudnn")
  assert config(precision="int8_fp8", dense_precision="fp8").dense_precision == "fp8"


def test_dense_config_precision():
  with pytest.raises(ValueError, match=r"DenseConfig.precision must be one of"):
    modjax.DenseConfig(precision="int4")
  with pytest.raises(ValueError, match=r"implementation must be None, got 'xla'"):
    modjax.DenseConfig(precision="fp8", implementation="xla")


@pytest.mark.parametrize("precision", ["fp8", "int8_fp8", "int8_bf16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_control_runs_the_quantized_function(precision, dtype):
  q, k, v = _qkv(1, dtype=dtype)
  n = -(-q.shape[1] // 64)
  mask = jax.random.bernoulli(jax.random.key(2), 0.5, (1, 2, n, n)) | jnp.eye(n, dtype=bool)
  ctl = AttentionControl(mode="sparse", block_mask=mask, block_size=64,
                         sparse_implementation="xla", precision=precision)
  out, _ = ctl.self_attention(q, k, v)
  want = pallas_kernels.quantized_attention_reference(q, k, v, mask, precision=precision,
                                                      block_size=64, quantize_p=False)
  exact = pallas_kernels.block_sparse_attention_reference(q, k, v, mask, block_size=64)
  assert out.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert _rel(out, want) < tol                       # the quantized function itself
  assert 1e-4 < _rel(out, exact) < 0.1               # quantized: near, not equal, to exact


@pytest.mark.parametrize("mode", ["dense", "dense_map"])
def test_dense_precision_quantizes_dense_steps_only(mode):
  q, k, v = _qkv(3)
  ctl = lambda **kw: AttentionControl(mode=mode, block_size=64, sparse_implementation="xla", **kw)
  plain, _ = ctl().self_attention(q, k, v)
  sparse_only, _ = ctl(precision="int8_fp8").self_attention(q, k, v)
  quant, stats = ctl(dense_precision="int8_fp8").self_attention(q, k, v)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(sparse_only))  # dense untouched
  want = pallas_kernels.quantized_attention_reference(q, k, v, None, precision="int8_fp8",
                                                      block_size=64, quantize_p=False)
  assert _rel(quant, want) < 1e-5 and _rel(quant, plain) > 1e-4
  if mode == "dense_map":
    smap = np.asarray(stats["sparsity_map"])
    assert smap.shape == (1, 2, 5, 5) and np.isfinite(smap).all()


def test_quantized_mod_sampler_compiles_once_and_stays_close():
  config, params = ts._model()
  family = wan.WanFamily(config)
  base = modjax.MODConfig(top_k=6, **ts.MOD_SMALL)
  outs = {}
  for name, att in {"bf16": base,
                    "sparse_q": modjax.MODConfig(top_k=6, precision="int8_fp8", **ts.MOD_SMALL),
                    "all_q": modjax.MODConfig(top_k=6, precision="int8_fp8",
                                              dense_precision="int8_fp8", **ts.MOD_SMALL)}.items():
    chex.clear_trace_counter()  # the counter is per function source, shared by the three
    fn = jax.jit(chex.assert_max_traces(modjax.sample_fn(family, ts._settings(att)), n=1))
    outs[name] = fn(params, *ts._inputs(1))
    fn(params, *ts._inputs(2))
    chex.assert_tree_all_finite(outs[name].latents)
  lat = {k: np.asarray(o.latents) for k, o in outs.items()}
  # quantizing changes the video a little, more when the dense steps are quantized too
  d_sparse, d_all = _rel(lat["sparse_q"], lat["bf16"]), _rel(lat["all_q"], lat["bf16"])
  assert 0 < d_sparse < 0.1 and 0 < d_all < 0.1
  assert not np.array_equal(lat["sparse_q"], lat["all_q"])
  # the dense warm-up of a sparse-only quantized run is the bf16 one: same first masks
  np.testing.assert_array_equal(np.asarray(outs["sparse_q"].density)[:ts.MOD_SMALL["warmup_steps"]],
                                np.asarray(outs["bf16"].density)[:ts.MOD_SMALL["warmup_steps"]])


def test_quantized_dense_config_runs_our_kernel():
  config, params = ts._model()
  fn = jax.jit(modjax.sample_fn(wan.WanFamily(config),
                                ts._settings(modjax.DenseConfig(precision="fp8"))))
  plain = jax.jit(modjax.sample_fn(wan.WanFamily(config), ts._settings(modjax.DenseConfig())))
  a, b = fn(params, *ts._inputs(1)).latents, plain(params, *ts._inputs(1)).latents
  assert 0 < _rel(a, b) < 0.1
