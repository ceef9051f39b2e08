"""encode_prompts against diffusers' WanPipeline._get_t5_prompt_embeds."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from models.text import T5EncoderConfig, Tokenizer, convert, encode_prompts
from models.text.prompts import prompt_clean

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from tests.models.text import oracles  # noqa: E402

PROMPTS = [
    "A red cat on the mat, in slow motion.",
    "  the   dog &amp;amp; the\tcat \x1c runs\u3000\u00a0fast &lt;3  ",
    "",
    " ".join(["a blue video of the cat"] * 20),  # longer than max_length
]
TRICKY = PROMPTS + ["\x1c\x1dx\x1f", "a\u200bb\u2028c\x85d\ufeff", "&amp;lt;b&amp;gt;", " \n "]


def test_prompt_clean_matches_diffusers():
  from diffusers.pipelines.wan import pipeline_wan
  for text in TRICKY:
    assert prompt_clean(text) == pipeline_wan.prompt_clean(text), repr(text)


def test_matches_wan_pipeline(tmp_path):
  model = oracles.hf_encoder("umt5", seed=9, vocab_size=256)
  model.save_pretrained(tmp_path / "text_encoder")
  tokenizer_folder = oracles.t5_tokenizer_folder(tmp_path / "tok")
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
  pipe = diffusers.WanPipeline(tokenizer=hf_tokenizer, text_encoder=model, vae=None,
                               scheduler=None)
  max_length = 24
  with torch.no_grad():
    expected = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=max_length,
                                          device=torch.device("cpu")).float().numpy()

  config, params = convert.load_text_encoder(tmp_path)  # the pipeline folder
  tokenizer = Tokenizer.from_folder(tokenizer_folder)
  assert tokenizer.vocab_size <= config.vocab_size
  ours = encode_prompts(config, params, tokenizer, PROMPTS, max_length=max_length)
  chex.assert_shape(ours, (len(PROMPTS), max_length, config.d_model))
  assert ours.dtype == jnp.float32
  err = float(np.max(np.abs(np.asarray(ours) - expected)))
  print(f"encode_prompts vs WanPipeline: max abs err {err:.2e}")
  chex.assert_trees_all_close(ours, expected, atol=2e-5, rtol=2e-5)

  lengths = tokenizer([prompt_clean(p) for p in PROMPTS], max_length=max_length)[1].sum(1)
  assert list(lengths[2:]) == [1, max_length]
  for i, n in enumerate(lengths):
    assert np.all(np.asarray(ours[i, n:]) == 0) and np.all(np.any(ours[i, :n] != 0, axis=-1))
  single = encode_prompts(config, params, tokenizer, PROMPTS[0], max_length=max_length)
  chex.assert_trees_all_close(single[0], ours[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("prompts", [3, None, [], ["a", 3], [b"a"], ("ok", ["nested"])],
                         ids=repr)
def test_bad_prompts(prompts):
  config = T5EncoderConfig.tiny()
  with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
    encode_prompts(config, None, None, prompts)
