"""Tiny seeded transformers encoders and a T5-style tokenizer, built inside the
tests (no hub): the oracles of the text tests. Importing this needs torch and
transformers; the tests that use it skip without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

# text_encoder/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (the 14B one has the
# same encoder) and of THUDM/CogVideoX-2b (T5 v1.1 XXL), transcribed by hand (no
# hub access here): every key those files carry, with their values.
WAN_UMT5_XXL = {
    "architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64,
    "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "umt5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "scalable_attention": True, "tie_word_embeddings": False,
    "tokenizer_class": "T5Tokenizer", "torch_dtype": "float32",
    "transformers_version": "4.48.0.dev0", "use_cache": True, "vocab_size": 256384,
}
COGVIDEOX_T5_XXL = {
    "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.41.0.dev0", "use_cache": True, "vocab_size": 32128,
}
CLASSES = {"umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel),
           "t5": (transformers.T5Config, transformers.T5EncoderModel)}


def hf_config(model_type: str, **overrides):
  """A tiny transformers config: 3 layers, buckets short enough that 37 tokens
  reach the log-spaced and the clipped buckets."""
  fields = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=12,
                feed_forward_proj="gated-gelu")
  return CLASSES[model_type][0](**{**fields, **overrides})


def hf_encoder(model_type: str, seed: int = 0, model_class=None, **overrides):
  """A seeded transformers encoder in eval mode; norm scales are perturbed from 1
  so that a mis-mapped norm shows."""
  config = hf_config(model_type, **overrides)
  torch.manual_seed(seed)
  model = (model_class or CLASSES[model_type][1])(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  return model


def hf_outputs(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long()).last_hidden_state
  return out.float().numpy()


def random_batch(vocab_size: int, lengths=(37, 20, 1), seed: int = 0):
  """ids [B, max(lengths)] random (padding positions too) and the 0/1 mask."""
  rng = np.random.default_rng(seed)
  length = max(lengths)
  ids = rng.integers(0, vocab_size, (len(lengths), length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


# --------------------------------------------------------------- tokenizer

_WORDS = ["the", "a", "cat", "dog", "on", "mat", "sit", "run", "red", "blue", "video", "of",
          "in", "and", "slow", "motion", "caf", "na", "ing", "ed", "s", "er"]


def build_tokenizer_json(path: Path) -> Path:
  """A small Unigram tokenizer.json written the way T5's converter writes one:
  <pad>=0, </s>=1, <unk>=2, WhitespaceSplit + Metaspace, `$A </s>` post-processor."""
  rng = np.random.default_rng(0)
  pieces = ["▁"] + [f"▁{w}" for w in _WORDS] + _WORDS + list("abcdefghijklmnopqrstuvwxyz")
  pieces += list("0123456789.,!?-'é") + ["▁" + c for c in "abcdefghijklmnopqrstuvwxyz"]
  pieces = list(dict.fromkeys(pieces))
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
  vocab += [(p, float(-1 - 4 * rng.random() - (len(p) == 1))) for p in pieces]
  tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  return path


def t5_tokenizer_folder(path: Path) -> Path:
  """build_tokenizer_json, loaded by transformers' T5 tokenizer and written back
  with its own save_pretrained (tokenizer.json, tokenizer_config.json, ...)."""
  raw = build_tokenizer_json(path / "raw")
  tok = transformers.T5TokenizerFast.from_pretrained(str(raw))
  tok.save_pretrained(str(path / "saved"))
  return path / "saved"


def write_json(path: Path, update: dict) -> None:
  raw = json.loads(path.read_text()) if path.exists() else {}
  raw.update(update)
  path.write_text(json.dumps(raw))
