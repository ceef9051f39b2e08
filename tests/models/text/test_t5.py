"""The Flax T5 encoders against transformers' UMT5EncoderModel / T5EncoderModel."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.text import t5
from models.text.t5 import T5EncoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.text import convert  # noqa: E402
from tests.models.text import oracles  # noqa: E402

F32_TOL = dict(atol=2e-5, rtol=2e-5)


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


CASES = [("umt5", "gated-gelu"), ("t5", "gated-gelu"), ("t5", "relu")]


@pytest.mark.parametrize("sharded", [False, True], ids=lambda s: f"{s=}")
@pytest.mark.parametrize("model_type,ffn", CASES, ids=lambda c: str(c))
def test_parity_with_transformers_f32(tmp_path, model_type, ffn, sharded):
  model = oracles.hf_encoder(model_type, seed=1, feed_forward_proj=ffn)
  model.save_pretrained(tmp_path, **({"max_shard_size": "4KB"} if sharded else {}))
  assert (tmp_path / "model.safetensors.index.json").exists() == sharded
  config, params = convert.load_text_encoder(tmp_path)
  assert config.relative_bias == ("per_layer" if model_type == "umt5" else "shared")
  assert config.feed_forward_proj == ffn
  ids, mask = oracles.random_batch(config.vocab_size)
  ours = t5.encode(config, params, ids, mask)
  chex.assert_shape(ours, (3, 37, config.d_model))
  assert ours.dtype == jnp.float32
  theirs = oracles.hf_outputs(model, ids, mask)
  print(f"{model_type} {ffn} {sharded=}: max abs err f32 {_max_err(ours, theirs):.2e}")
  chex.assert_trees_all_close(ours, theirs, **F32_TOL)


@pytest.mark.parametrize("model_type", ["umt5", "t5"])
def test_bf16_close_to_f32(tmp_path, model_type):
  model = oracles.hf_encoder(model_type, seed=2)
  model.save_pretrained(tmp_path)
  config, params = convert.load_text_encoder(tmp_path)
  config16, params16 = convert.load_text_encoder(tmp_path, dtype="bfloat16",
                                                 param_dtype="bfloat16")
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params16))
  ids, mask = oracles.random_batch(config.vocab_size, seed=3)
  ref = t5.encode(config, params, ids, mask)
  out = t5.encode(config16, params16, ids, mask)
  assert out.dtype == jnp.float32
  err, scale = _max_err(out, ref), float(jnp.max(jnp.abs(ref)))
  # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); 3 layers of bf16
  # weights and products stay within 2% of the output's largest value (measured:
  # under 1%).
  print(f"{model_type}: max abs err bf16 vs f32 {err:.2e} (largest |value| {scale:.2f})")
  assert err <= 0.02 * scale
  # ... and transformers in bf16 lands as close to its own f32 result.
  hf16 = oracles.hf_outputs(model.to(torch.bfloat16), ids, mask)
  print(f"{model_type}: transformers bf16 vs our f32 {_max_err(hf16, ref):.2e}")


def test_relative_position_buckets_match_transformers():
  from transformers.models.umt5.modeling_umt5 import UMT5Attention
  for buckets, distance in [(32, 128), (8, 12), (64, 256)]:
    hf_config = transformers.UMT5Config(relative_attention_num_buckets=buckets,
                                        relative_attention_max_distance=distance)
    attention = UMT5Attention(hf_config, has_relative_attention_bias=True)
    length = 600
    pos = torch.arange(length)
    theirs = attention._relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), theirs)


def test_encode_compiles_once_per_shape():
  config = T5EncoderConfig.tiny(num_layers=3)
  params = t5.init_params(config, jax.random.key(0))
  @jax.jit
  @chex.assert_max_traces(n=1)
  def traced(params, ids, mask):  # encode is jit-able: one trace for one shape
    return t5.encode(config, params, ids, mask)

  before = t5._encode._cache_size()
  for seed in range(3):
    ids, mask = oracles.random_batch(config.vocab_size, lengths=(13, 5), seed=seed)
    direct = t5.encode(config, params, ids, mask)
    chex.assert_trees_all_close(traced(params, ids, mask), direct, **F32_TOL)
  assert t5._encode._cache_size() == before + 1


def test_padding_keys_are_masked():
  config = T5EncoderConfig.tiny()
  params = t5.init_params(config, jax.random.key(1))
  ids, mask = oracles.random_batch(config.vocab_size, lengths=(9, 4), seed=4)
  out = t5.encode(config, params, ids, mask)
  other = ids.copy()
  other[1, 4:] = (other[1, 4:] + 7) % config.vocab_size  # change only padding tokens
  out2 = t5.encode(config, params, other, mask)
  chex.assert_trees_all_close(out[1, :4], out2[1, :4], **F32_TOL)
  assert not np.allclose(out[1, 4:], out2[1, 4:])
  short = t5.encode(config, params, ids[1:, :4], mask[1:, :4])  # no padding at all
  chex.assert_trees_all_close(out[1, :4], short[0], **F32_TOL)


@pytest.mark.parametrize("preset,raw,model_class", [
    ("umt5_xxl", oracles.WAN_UMT5_XXL, "UMT5EncoderModel"),
    ("t5_v1_1_xxl", oracles.COGVIDEOX_T5_XXL, "T5EncoderModel"),
], ids=["wan2.1_umt5_xxl", "cogvideox_t5_v1_1_xxl"])
def test_full_size_names_and_shapes(preset, raw, model_class):
  config = T5EncoderConfig.from_transformers_config(raw, param_dtype="bfloat16",
                                                    dtype="bfloat16")
  assert config == getattr(T5EncoderConfig, preset)()
  hf_class = getattr(transformers, model_class)
  config_class = transformers.UMT5Config if raw["model_type"] == "umt5" else transformers.T5Config
  with torch.device("meta"):  # no weight is allocated
    model = hf_class(config_class(**{k: v for k, v in raw.items() if k != "model_type"}))
  theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
  ours = convert.transformers_tensor_shapes(config)  # through jax.eval_shape
  assert ours == theirs
  n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(t5.param_shapes(config)))
  assert n_params == sum(p.numel() for p in model.parameters())


def test_config_validation():
  with pytest.raises(ValueError, match="relative_bias must be one of"):
    T5EncoderConfig.tiny(relative_bias="none")
  with pytest.raises(ValueError, match="feed_forward_proj must be one of"):
    T5EncoderConfig.tiny(feed_forward_proj="gated-swish")
  with pytest.raises(ValueError, match="dtype must be one of"):
    T5EncoderConfig.tiny(dtype="float16")
  with pytest.raises(ValueError, match="num_heads must be a positive int"):
    T5EncoderConfig.tiny(num_heads=0)
  with pytest.raises(ValueError, match="relative_attention_max_distance must be >"):
    T5EncoderConfig.tiny(relative_attention_num_buckets=32, relative_attention_max_distance=8)


def test_encode_rejects_bad_inputs():
  config = T5EncoderConfig.tiny()
  params = t5.param_shapes(config)  # never reaches the model
  with pytest.raises(ValueError, match="input_ids must be an int array"):
    t5.encode(config, params, np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="input_ids must lie in"):
    t5.encode(config, params, np.full((1, 3), config.vocab_size))
  with pytest.raises(ValueError, match="attention_mask must have the shape"):
    t5.encode(config, params, np.zeros((2, 3), np.int32), np.ones((2, 4), np.int32))
