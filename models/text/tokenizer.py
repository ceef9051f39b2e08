"""The T5 tokenizer of a checkpoint, through the `tokenizers` library only.

`Tokenizer.from_folder` reads tokenizer.json (the whole pipeline: normalizer,
pre-tokenizer, model, post-processor) and, where present, tokenizer_config.json
and special_tokens_map.json for the pad and eos tokens, model_max_length and the
padding / truncation sides (special_tokens_map.json wins where both name a
token). Calling it returns what transformers' fast T5 tokenizer returns with
`padding="max_length", truncation=True, add_special_tokens=True,
return_attention_mask=True`: ids truncated so that, with the `</s>` the T5
post-processor appends, they fit max_length, then padded to max_length.

A tokenizer.json without a post-processor gets T5's (`$A </s>`), as
transformers' T5Tokenizer installs it. Otherwise the file is used as written;
transformers 5's T5Tokenizer instead rebuilds the pipeline from the vocab (its
own Metaspace pre-tokenizer, unk id 2, no byte fallback), which only differs
from the file for files that were not written that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import processors

from models import weights

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SIDES = ("right", "left")
# T5Tokenizer's defaults.
_DEFAULT_PAD, _DEFAULT_EOS = "<pad>", "</s>"


def _token(value: Any, where: str, key: str) -> Optional[str]:
  """A special token as written in a tokenizer json: a string or an AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{where}: {key} must be a string or a token dict with 'content', got {value!r}")


def tokenizer_dir(path) -> Path:
  """The folder with tokenizer.json: path itself or its tokenizer/ subfolder."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"no tokenizer at {str(path)!r}: not a folder")
  if not (path / TOKENIZER_FILE).exists() and (path / "tokenizer" / TOKENIZER_FILE).exists():
    return path / "tokenizer"  # a pipeline folder
  if not (path / TOKENIZER_FILE).exists():
    found = sorted(p.name for p in path.iterdir())
    hint = ""
    if any(name.endswith(".model") for name in found):
      hint = (" It holds a sentencepiece model only: convert it to tokenizer.json first, e.g. "
              "with transformers (needs sentencepiece and protobuf): "
              "T5TokenizerFast.from_pretrained(folder).save_pretrained(folder).")
    raise FileNotFoundError(f"no {TOKENIZER_FILE} in {str(path)!r} (nor in its tokenizer/ "
                            f"folder); found: {found or 'nothing'}.{hint}")
  return path


class Tokenizer:
  """Text -> (input_ids, attention_mask), both int32 [B, max_length].

  pad_token / eos_token: the token strings; pad_id / eos_id their ids.
  model_max_length: the checkpoint's own limit (informational: max_length
  decides). padding_side / truncation_side: "right" (T5) or "left".
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, pad_token: str = _DEFAULT_PAD,
               eos_token: str = _DEFAULT_EOS, model_max_length: Optional[int] = None,
               padding_side: str = "right", truncation_side: str = "right",
               where: str = "tokenizer"):
    for key, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
      if side not in SIDES:
        raise ValueError(f"{where}: {key} must be one of {SIDES}, got {side!r}")
    ids = {}
    for key, token in (("pad_token", pad_token), ("eos_token", eos_token)):
      ids[key] = backend.token_to_id(token) if isinstance(token, str) else None
      if ids[key] is None:
        raise ValueError(f"{where}: {key} {token!r} is not in the tokenizer's vocabulary")
    self._backend = backend
    if backend.post_processor is None:
      backend.post_processor = processors.TemplateProcessing(
          single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}",
          special_tokens=[(eos_token, ids["eos_token"])])
    self.pad_token, self.eos_token = pad_token, eos_token
    self.pad_id, self.eos_id = ids["pad_token"], ids["eos_token"]
    self.model_max_length = model_max_length
    self.padding_side, self.truncation_side = padding_side, truncation_side

  @classmethod
  def from_folder(cls, path) -> Tokenizer:
    """Reads a tokenizer folder (or a pipeline folder with a tokenizer/ subfolder)."""
    folder = tokenizer_dir(path)
    file = folder / TOKENIZER_FILE
    try:
      backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser's errors carry no file name
      raise ValueError(f"{str(file)!r} is not a valid tokenizers file: {e}") from None
    settings = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):  # the later file wins
      if (folder / name).exists():
        raw = weights.read_json(folder / name)
        where = str(folder / name)
        for key in ("pad_token", "eos_token"):
          if raw.get(key) is not None:
            settings[key] = _token(raw[key], where, key)
        for key in ("padding_side", "truncation_side", "model_max_length"):
          if name == TOKENIZER_CONFIG and raw.get(key) is not None:
            settings[key] = raw[key]
    max_len = settings.get("model_max_length")
    if max_len is not None and not (isinstance(max_len, int) and not isinstance(max_len, bool)):
      raise ValueError(f"{str(folder / TOKENIZER_CONFIG)!r}: model_max_length must be an int, "
                       f"got {max_len!r}")
    return cls(backend, where=str(folder), **settings)

  @property
  def vocab_size(self) -> int:
    """Ids run in [0, vocab_size), added tokens included."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def __call__(self, texts: str | Sequence[str], max_length: int = 512
               ) -> tuple[np.ndarray, np.ndarray]:
    """texts (a string or a list of strings) -> (input_ids, attention_mask), int32
    [B, max_length]; attention_mask is 1 on tokens, 0 on padding."""
    if isinstance(texts, str):
      texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
      raise ValueError(f"texts must be a string or a non-empty list of strings, got {texts!r}")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
      raise ValueError(f"texts must be a string or a non-empty list of strings, got a list with "
                       f"{', '.join(sorted(set(bad)))} items")
    least = max(1, self._backend.post_processor.num_special_tokens_to_add(False))
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < least:
      raise ValueError(f"max_length must be an int >= {least} (room for the special tokens), "
                       f"got {max_length!r}")
    self._backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                    direction=self.truncation_side)
    self._backend.enable_padding(direction=self.padding_side, pad_id=self.pad_id, pad_type_id=0,
                                 pad_token=self.pad_token, length=max_length)
    encodings = self._backend.encode_batch(list(texts), add_special_tokens=True)
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask

  def __repr__(self):
    return (f"Tokenizer(vocab_size={self.vocab_size}, pad_token={self.pad_token!r}, "
            f"eos_token={self.eos_token!r}, model_max_length={self.model_max_length})")
