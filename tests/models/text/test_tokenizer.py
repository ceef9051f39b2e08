"""Our tokenizer against transformers' T5 tokenizers on a tokenizer.json built here."""

import json

import numpy as np
import pytest

from models.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

from tests.models.text import oracles  # noqa: E402

TEXTS = [
    "a cat on the mat",
    "",
    "héllo wörld ✓ 日本語 — naïve café",
    " ".join(["the red cat runs in slow motion"] * 80),  # longer than 512 tokens
    "  spaces   and\ttabs\n",
    "the dog.the cat! 42",
    "fill <extra_id_0> here </s> and on",
]
CALL = dict(padding="max_length", truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="np")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(tokenizer.json as built, the folder transformers' T5 tokenizer saved from it)."""
  root = tmp_path_factory.mktemp("tokenizer")
  return root / "raw", oracles.t5_tokenizer_folder(root)


def _assert_same(ours, oracle, texts, max_length):
  ids, mask = ours(texts, max_length=max_length)
  expected = oracle(texts, max_length=max_length, **CALL)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.shape == mask.shape == (len(texts), max_length)
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"])
  return ids, mask


@pytest.mark.parametrize("max_length", [24, 512])
def test_matches_transformers_t5_tokenizer(folders, max_length):
  raw, saved = folders
  ours = Tokenizer.from_folder(saved)
  ids, mask = _assert_same(ours, transformers.AutoTokenizer.from_pretrained(saved), TEXTS,
                           max_length)
  lengths = mask.sum(1)
  assert (ids[np.arange(len(TEXTS)), lengths - 1] == ours.eos_id).all()  # </s> ends every text
  assert lengths[1] == 1 and lengths[3] == max_length  # "" is just </s>; the long one is cut
  assert (ids[mask == 0] == ours.pad_id).all()
  # The file as written, through the generic fast tokenizer.
  generic = transformers.PreTrainedTokenizerFast(tokenizer_file=str(raw / "tokenizer.json"),
                                                 pad_token="<pad>", eos_token="</s>")
  _assert_same(Tokenizer.from_folder(raw), generic, TEXTS, max_length)


def test_one_string_and_batches_of_one(folders):
  ours = Tokenizer.from_folder(folders[1])
  for text in TEXTS:
    single = ours(text, max_length=16)
    batch = ours(TEXTS, max_length=16)
    i = TEXTS.index(text)
    np.testing.assert_array_equal(single[0][0], batch[0][i])


def test_left_sides_from_tokenizer_config(folders, tmp_path):
  saved = folders[1]
  for f in saved.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  oracles.write_json(tmp_path / "tokenizer_config.json",
                     {"padding_side": "left", "truncation_side": "left"})
  ours = Tokenizer.from_folder(tmp_path)
  assert (ours.padding_side, ours.truncation_side) == ("left", "left")
  ids, _ = _assert_same(ours, transformers.AutoTokenizer.from_pretrained(tmp_path), TEXTS, 20)
  assert ids[0, 0] == ours.pad_id


def test_missing_post_processor_gets_t5s(folders, tmp_path):
  raw = json.loads((folders[0] / "tokenizer.json").read_text())
  raw["post_processor"] = None
  (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
  texts = TEXTS[:-1]  # T5TokenizerFast adds <extra_id_*> tokens this file lacks
  ids, mask = _assert_same(Tokenizer.from_folder(tmp_path),
                           transformers.T5TokenizerFast.from_pretrained(tmp_path), texts, 12)
  np.testing.assert_array_equal(ids, Tokenizer.from_folder(folders[0])(texts, 12)[0])
  assert ids[1, 0] == 1 and mask[1].sum() == 1


def test_special_tokens_from_the_json_files(folders, tmp_path):
  for f in folders[1].iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  (tmp_path / "special_tokens_map.json").write_text(
      json.dumps({"pad_token": {"content": "<unk>", "lstrip": False}, "eos_token": "</s>"}))
  ours = Tokenizer.from_folder(tmp_path)
  assert (ours.pad_token, ours.pad_id) == ("<unk>", 2)
  assert (ours(["a"], max_length=5)[0][0, 2:] == 2).all()
  oracles.write_json(tmp_path / "special_tokens_map.json", {"pad_token": "<nope>"})
  with pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer's vocabulary"):
    Tokenizer.from_folder(tmp_path)


def test_missing_tokenizer_json(tmp_path):
  (tmp_path / "spiece.model").write_bytes(b"\0")
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"no tokenizer.json .*found: \['spiece.model', "
                                              r"'tokenizer_config.json'\].*sentencepiece.*convert"):
    Tokenizer.from_folder(tmp_path)
  (tmp_path / "spiece.model").unlink()
  with pytest.raises(FileNotFoundError, match=r"found: \['tokenizer_config.json'\]\.$"):
    Tokenizer.from_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a folder"):
    Tokenizer.from_folder(tmp_path / "nothing")


def test_bad_texts_and_max_length(folders):
  ours = Tokenizer.from_folder(folders[1])
  for texts in ([], ["a", 3], None, [b"bytes"]):
    with pytest.raises(ValueError, match="texts must be a string or a non-empty list of strings"):
      ours(texts)
  for max_length in (0, 2.5, True):
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
      ours(["a"], max_length=max_length)
