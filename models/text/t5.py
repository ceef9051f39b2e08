"""T5-family text ENCODERS in Flax Linen: UMT5 (Wan2.1) and T5 v1.1 (CogVideoX).

The math follows transformers' `UMT5EncoderModel` / `T5EncoderModel` (inference:
no dropout, no decoder): token embedding, `num_layers` pre-norm blocks of
self-attention and feed-forward, a final norm. The T5 specifics:

- T5 layer norm: RMS only (no mean subtraction, no bias), a learned scale.
- No 1/sqrt(d) scaling of the attention scores; instead a learned relative
  position bias [num_buckets, num_heads] is added to them. Buckets are
  bidirectional, computed exactly as transformers does (float32 logs, truncation
  toward zero) for the static sequence length. `relative_bias="per_layer"`
  (UMT5): every layer owns its table. `"shared"` (T5 v1.1, mT5): only layer 0
  has one and every layer adds that layer-0 bias.
- Feed-forward `wi -> act -> wo` ("relu", "gelu", ...) or gated
  `act(wi_0 x) * wi_1 x -> wo` ("gated-gelu": gelu_new, the tanh approximation).

Mixed precision: the matrix products run in `config.dtype`; the residual stream,
layer norms, position bias, softmax and activations in float32. With
`wo_float32` (default) the FFN output projection also runs in float32, as
transformers keeps `wo` in float32 (`_keep_in_fp32_modules`) when the rest of
the model is loaded in bfloat16. Every float32 matrix product asks for full
precision (no TF32 on GPUs). The output is float32.

Layers run under `nn.scan`: the per-layer params carry a leading layer axis
under "block" (one compile of one block, whatever num_layers is).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import validate, weights

f32 = jnp.float32
DTYPES = ("float32", "bfloat16")
RELATIVE_BIASES = ("per_layer", "shared")
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # 0.5x(1+tanh(...)) exactly
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}
# transformers: "gated-gelu" means gelu_new (backwards compatibility); otherwise
# "gated-<act>" or "<act>" with <act> a key of ACT2FN.
FEED_FORWARD_PROJS = tuple(ACTIVATIONS) + tuple(f"gated-{a}" for a in ACTIVATIONS)

# model_type -> how the relative bias is held. mT5 has T5 v1.1's math.
_MODEL_TYPES = {"umt5": "per_layer", "t5": "shared", "mt5": "shared"}
_ARCHITECTURES = {
    "umt5": ("UMT5EncoderModel", "UMT5Model", "UMT5ForConditionalGeneration"),
    "t5": ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration"),
    "mt5": ("MT5EncoderModel", "MT5Model", "MT5ForConditionalGeneration"),
}
# The constructor arguments of transformers' T5Config / UMT5Config that shape the
# encoder, with each class's defaults (a missing key takes its class's default).
_COMMON_DEFAULTS = {"d_kv": 64, "relative_attention_num_buckets": 32,
                    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
                    "model_type": None, "architectures": None, "dense_act_fn": None,
                    "is_gated_act": None, "is_decoder": False}
_DEFAULTS = {
    "t5": {**_COMMON_DEFAULTS, "vocab_size": 32128, "d_model": 512, "d_ff": 2048,
           "num_layers": 6, "num_heads": 8, "feed_forward_proj": "relu"},
    "umt5": {**_COMMON_DEFAULTS, "vocab_size": 250112, "d_model": 512, "d_ff": 1024,
             "num_layers": 8, "num_heads": 6, "feed_forward_proj": "gated-gelu"},
}
_DEFAULTS["mt5"] = {**_DEFAULTS["t5"], "vocab_size": 250112, "d_ff": 1024, "num_layers": 8,
                    "num_heads": 6, "feed_forward_proj": "gated-gelu"}
# Keys of real checkpoints' config.json (Wan2.1's UMT5-XXL, CogVideoX's T5 v1.1
# XXL, transformers 4.x and 5.x save_pretrained) that do not change the encoder's
# output: the decoder, training, generation, token ids, bookkeeping.
_IGNORED_KEYS = (
    "num_decoder_layers", "decoder_start_token_id", "is_encoder_decoder", "use_cache",
    "output_past", "tie_word_embeddings", "scale_decoder_outputs", "dropout_rate",
    "classifier_dropout", "initializer_factor", "gradient_checkpointing", "pad_token_id",
    "eos_token_id", "bos_token_id", "sep_token_id", "tokenizer_class", "torch_dtype", "dtype",
    "transformers_version", "scalable_attention", "n_positions", "task_specific_params",
    "return_dict", "output_hidden_states", "output_attentions", "use_return_dict",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "prefix",
)


_dtype = functools.partial(validate.dtype, "T5EncoderConfig", allowed=DTYPES)
_positive_int = functools.partial(validate.integer, "T5EncoderConfig")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """A T5-family encoder. Field names are transformers' T5Config names.

  relative_bias: "per_layer" (UMT5) or "shared" (T5 v1.1: layer 0's bias in
  every layer). feed_forward_proj: one of FEED_FORWARD_PROJS. dtype is the
  compute dtype of the matrix products, param_dtype the storage dtype; both
  "float32" or "bfloat16". wo_float32: run the FFN output projection in float32.
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_bias: str
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  param_dtype: Any = "float32"
  dtype: Any = "float32"
  wo_float32: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
    # Bidirectional buckets: half per direction, half of those exact; the log
    # range needs max_exact >= 1 and max_distance > max_exact.
    max_exact = self.relative_attention_num_buckets // 4
    if max_exact < 1:
      raise ValueError(f"T5EncoderConfig.relative_attention_num_buckets must be >= 4, got "
                       f"{self.relative_attention_num_buckets}")
    if self.relative_attention_max_distance <= max_exact:
      raise ValueError(
          f"T5EncoderConfig.relative_attention_max_distance must be > "
          f"relative_attention_num_buckets // 4 = {max_exact}, got "
          f"{self.relative_attention_max_distance}")
    if self.relative_bias not in RELATIVE_BIASES:
      raise ValueError(
          f"T5EncoderConfig.relative_bias must be one of {RELATIVE_BIASES}, got {self.relative_bias!r}")
    if self.feed_forward_proj not in FEED_FORWARD_PROJS:
      raise ValueError(f"T5EncoderConfig.feed_forward_proj must be one of {FEED_FORWARD_PROJS}, "
                       f"got {self.feed_forward_proj!r}")
    eps = self.layer_norm_epsilon
    if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not eps > 0:
      raise ValueError(f"T5EncoderConfig.layer_norm_epsilon must be a float > 0, got {eps!r}")
    object.__setattr__(self, "layer_norm_epsilon", float(eps))
    if not isinstance(self.wo_float32, bool):
      raise ValueError(f"T5EncoderConfig.wo_float32 must be a bool, got {self.wo_float32!r}")
    object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))

  # ---------------------------------------------------------------- presets

  @classmethod
  def umt5_xxl(cls, **overrides) -> T5EncoderConfig:
    """The UMT5-XXL encoder of Wan2.1 (T2V 1.3B and 14B), in bfloat16."""
    return cls(**{**dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                         num_heads=64, relative_bias="per_layer", param_dtype="bfloat16",
                         dtype="bfloat16"),
                  **overrides})

  @classmethod
  def t5_v1_1_xxl(cls, **overrides) -> T5EncoderConfig:
    """The T5 v1.1 XXL encoder of CogVideoX, in bfloat16."""
    return cls(**{**dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                         num_heads=64, relative_bias="shared", param_dtype="bfloat16",
                         dtype="bfloat16"),
                  **overrides})

  @classmethod
  def tiny(cls, **overrides) -> T5EncoderConfig:
    """Two small layers with short bucket ranges: a CPU-fast stand-in."""
    return cls(**{**dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                         relative_bias="per_layer", relative_attention_num_buckets=8,
                         relative_attention_max_distance=16),
                  **overrides})

  # ------------------------------------------------------------ derived

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    """The ACT2FN name of the FFN activation ("gated-gelu" is gelu_new)."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.removeprefix("gated-")

  @property
  def model_type(self) -> str:
    return "umt5" if self.relative_bias == "per_layer" else "t5"

  # ----------------------------------------------------- transformers config

  @classmethod
  def from_transformers_config(cls, raw: Mapping[str, Any], *, where: str = "config",
                               **overrides) -> T5EncoderConfig:
    """A transformers T5Config / UMT5Config / MT5Config dict (config.json) -> config.

    Unknown keys are an error; keys that do not change the encoder's math
    (_IGNORED_KEYS) are dropped; dense_act_fn / is_gated_act, when present, must
    agree with feed_forward_proj. overrides set our own fields (dtype,
    param_dtype, wo_float32).
    """
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
      raise ValueError(f"{where}: model_type must be one of {sorted(_MODEL_TYPES)}, "
                       f"got {model_type!r}")
    parsed = weights.parse_config(raw, _DEFAULTS[model_type], where=where, ignored=_IGNORED_KEYS)
    architectures = parsed.pop("architectures")
    if architectures is not None:
      if (not isinstance(architectures, (list, tuple))
          or any(a not in _ARCHITECTURES[model_type] for a in architectures)):
        raise ValueError(f"{where}: architectures of model_type {model_type!r} must be among "
                         f"{list(_ARCHITECTURES[model_type])}, got {architectures!r}")
    if parsed.pop("is_decoder"):
      raise ValueError(f"{where}: is_decoder is true; only encoders (is_decoder false) are built")
    parsed.pop("model_type")
    dense_act_fn, is_gated_act = parsed.pop("dense_act_fn"), parsed.pop("is_gated_act")
    ff = parsed["feed_forward_proj"]
    if ff not in FEED_FORWARD_PROJS:
      raise ValueError(f"{where}: feed_forward_proj must be one of {FEED_FORWARD_PROJS}, got {ff!r}")
    act = "gelu_new" if ff == "gated-gelu" else ff.removeprefix("gated-")
    for key, value, implied in (("dense_act_fn", dense_act_fn, act),
                                ("is_gated_act", is_gated_act, ff.startswith("gated-"))):
      if value is not None and value != implied:
        raise ValueError(f"{where}: {key}={value!r} contradicts feed_forward_proj={ff!r} "
                         f"(which implies {key}={implied!r})")
    return cls(**{**parsed, "relative_bias": _MODEL_TYPES[model_type], **overrides})

  def to_transformers_config(self) -> dict:
    """The config.json of the transformers encoder class with this math."""
    names = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
             "relative_attention_num_buckets", "relative_attention_max_distance",
             "layer_norm_epsilon", "feed_forward_proj")
    return {"architectures": [_ARCHITECTURES[self.model_type][0]], "model_type": self.model_type,
            **{n: getattr(self, n) for n in names}, "dense_act_fn": self.activation,
            "is_gated_act": self.is_gated, "is_decoder": False}


# ---------------------------------------------------------- position bias

def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets [length, length] (int32) of key - query positions,
  exactly as transformers' `_relative_position_bucket` (float32 logs, truncation)."""
  pos = np.arange(length, dtype=np.int64)
  relative = pos[None, :] - pos[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  is_small = distance < max_exact
  with np.errstate(divide="ignore"):  # log(0) on the exact side, masked below
    log_ratio = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)))
  log_ratio = np.where(is_small, 0, log_ratio * np.float32(half - max_exact))
  large = np.minimum(max_exact + log_ratio.astype(np.int64), half - 1)
  return (buckets + np.where(is_small, distance, large)).astype(np.int32)


def _position_bias(table, buckets):
  """table [num_buckets, H], buckets [L, L] -> float32 bias [H, L, L]."""
  return jnp.take(table.astype(f32), buckets, axis=0).transpose(2, 0, 1)


# ------------------------------------------------------------------ layers

def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == f32 else None


def _dense(features: int, dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  precision=_precision(dtype), name=name)


class T5LayerNorm(nn.Module):
  """RMS norm with a learned scale, no mean, no bias; float32 in and out."""
  eps: float
  param_dtype: Any = f32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x = x.astype(f32)
    x = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return x * scale.astype(f32)


class T5Attention(nn.Module):
  """Unscaled multi-head self-attention with an additive position bias.

  x [B, L, d_model] (compute dtype), mask [B, L] bool (False: padding key),
  bias [H, L, L] float32 or None (then this layer's own table and `buckets`).
  """
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, x, mask, buckets, bias):
    cfg = self.config
    if bias is None:
      table = self.param("relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                         (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype)
      bias = _position_bias(table, buckets)
    heads = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)
    dense = lambda n, f: _dense(f, cfg.dtype, cfg.param_dtype, n)
    q, k, v = (heads(dense(n, cfg.inner_dim)(x)) for n in ("q", "k", "v"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32,
                        precision=_precision(cfg.dtype))
    scores = jnp.where(mask[:, None, None, :], scores + bias[None], jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_precision(cfg.dtype))
    return dense("o", cfg.d_model)(out.reshape(*x.shape[:2], cfg.inner_dim))


class T5FeedForward(nn.Module):
  """wi -> act -> wo, or act(wi_0 x) * wi_1 x -> wo; activations in float32."""
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    act = ACTIVATIONS[cfg.activation]
    dense = lambda n, f: _dense(f, cfg.dtype, cfg.param_dtype, n)
    if cfg.is_gated:
      h = act(dense("wi_0", cfg.d_ff)(x).astype(f32)) * dense("wi_1", cfg.d_ff)(x).astype(f32)
    else:
      h = act(dense("wi", cfg.d_ff)(x).astype(f32))
    out_dtype = f32 if cfg.wo_float32 else cfg.dtype
    return _dense(cfg.d_model, out_dtype, cfg.param_dtype, "wo")(h.astype(out_dtype))


class T5Block(nn.Module):
  """Pre-norm self-attention and feed-forward; the residual stream is float32."""
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, x, mask, buckets, shared_bias):
    cfg = self.config
    norm = lambda name: T5LayerNorm(cfg.layer_norm_epsilon, cfg.param_dtype, name=name)
    h = norm("attention_norm")(x).astype(cfg.dtype)
    x = x + T5Attention(cfg, name="attention")(h, mask, buckets, shared_bias).astype(f32)
    h = norm("ffn_norm")(x).astype(cfg.dtype)
    x = x + T5FeedForward(cfg, name="ffn")(h).astype(f32)
    return x, None


class T5Encoder(nn.Module):
  """(input_ids [B, L] int, attention_mask [B, L] bool) -> last_hidden_state
  [B, L, d_model] float32."""
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    cfg = self.config
    table = self.param("embed_tokens", nn.initializers.normal(1.0),
                       (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
    x = jnp.take(table, input_ids, axis=0).astype(f32)
    buckets = jnp.asarray(relative_position_buckets(
        input_ids.shape[1], cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance))
    shared_bias = None
    if cfg.relative_bias == "shared":
      shared = self.param("relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                          (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype)
      shared_bias = _position_bias(shared, buckets)
    blocks = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers)
    x, _ = blocks(cfg, name="block")(x, attention_mask, buckets, shared_bias)
    return T5LayerNorm(cfg.layer_norm_epsilon, cfg.param_dtype, name="final_layer_norm")(x)


# -------------------------------------------------------------- functional

def _dummy_inputs():
  return jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)


def init_params(config: T5EncoderConfig, rng: jax.Array):
  """Randomly initialised params (per-layer params stacked under "block")."""
  return jax.jit(T5Encoder(config).init)(rng, *_dummy_inputs())["params"]


def param_shapes(config: T5EncoderConfig):
  """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
  return jax.eval_shape(T5Encoder(config).init, jax.random.key(0), *_dummy_inputs())["params"]


@functools.partial(jax.jit, static_argnums=0)
def _encode(config, params, input_ids, attention_mask):
  return T5Encoder(config).apply({"params": params}, input_ids, attention_mask)


def encode(config: T5EncoderConfig, params, input_ids, attention_mask=None) -> jax.Array:
  """last_hidden_state [B, L, d_model] float32 of input_ids [B, L] (int).

  attention_mask [B, L] (bool or 0/1 ints; None: every token) masks padding
  keys, as transformers' attention_mask. Pure and jit-able; called directly it
  compiles once per (config, shapes). Ids given as host (numpy) arrays are
  checked to lie in [0, vocab_size).
  """
  ids_shape = np.shape(input_ids)
  if len(ids_shape) != 2 or not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
    raise ValueError(f"input_ids must be an int array [B, L], got shape {ids_shape} and dtype "
                     f"{jnp.result_type(input_ids)}")
  if 0 in ids_shape:
    raise ValueError(f"input_ids must have B >= 1 and L >= 1, got shape {ids_shape}")
  if isinstance(input_ids, (np.ndarray, list, tuple)):
    ids = np.asarray(input_ids)
    if ids.min() < 0 or ids.max() >= config.vocab_size:
      raise ValueError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                       f"[{ids.min()}, {ids.max()}]")
  if attention_mask is None:
    attention_mask = jnp.ones(ids_shape, bool)
  if np.shape(attention_mask) != ids_shape:
    raise ValueError(f"attention_mask must have the shape of input_ids {ids_shape}, got "
                     f"{np.shape(attention_mask)}")
  mask = jnp.asarray(attention_mask)
  mask = mask if mask.dtype == bool else mask > 0
  return _encode(config, params, jnp.asarray(input_ids, jnp.int32), mask)
