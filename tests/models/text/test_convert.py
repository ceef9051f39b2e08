"""Reading and writing transformers-format T5 encoder folders, and their errors."""

import json

import chex
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import weights
from models.text import convert, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.models.text import oracles  # noqa: E402

F32_TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
  """(torch model, its save_pretrained folder, a batch)."""
  folder = tmp_path_factory.mktemp("umt5")
  model = oracles.hf_encoder("umt5", seed=5)
  model.save_pretrained(folder)
  return model, folder, oracles.random_batch(model.config.vocab_size, seed=6)


def _check_parity(folder, model, batch):
  config, params = convert.load_text_encoder(folder)
  chex.assert_trees_all_close(t5.encode(config, params, *batch), oracles.hf_outputs(model, *batch),
                              **F32_TOL)
  return config, params


def _rewrite(folder, edit):
  file = folder / "model.safetensors"
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def _copy(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


@pytest.mark.parametrize("sharded", [False, True], ids=lambda s: f"{s=}")
def test_save_round_trip_through_transformers(tmp_path, umt5, sharded):
  model, folder, batch = umt5
  config, params = convert.load_text_encoder(folder)
  convert.save_text_encoder(config, params, tmp_path, max_shard_size=2048 if sharded else 2**30)
  assert (tmp_path / "model.safetensors.index.json").exists() == sharded
  reloaded = transformers.UMT5EncoderModel.from_pretrained(tmp_path).eval()
  for name, tensor in model.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), name)
  _check_parity(tmp_path, reloaded, batch)


def test_pipeline_folder_and_embedding_aliases(tmp_path, umt5):
  model, folder, batch = umt5
  alias = _copy(folder, tmp_path / "text_encoder")
  _rewrite(alias, lambda t: t.__setitem__("encoder.embed_tokens.weight", t.pop("shared.weight")))
  _check_parity(tmp_path, model, batch)  # the pipeline folder, embed_tokens only
  both = _copy(folder, tmp_path / "both")
  _rewrite(both, lambda t: t.__setitem__("encoder.embed_tokens.weight", t["shared.weight"] + 1))
  _check_parity(both, model, batch)  # shared.weight wins, as transformers ties to it
  none = _copy(folder, tmp_path / "none")
  _rewrite(none, lambda t: t.pop("shared.weight"))
  with pytest.raises(ValueError, match=r"missing \(1\): shared.weight"):
    convert.load_text_encoder(none)


def test_full_t5_checkpoint_skips_the_decoder(tmp_path):
  full = oracles.hf_encoder("t5", seed=7, model_class=transformers.T5ForConditionalGeneration)
  full.save_pretrained(tmp_path)
  assert any(n.startswith("decoder.") for n in load_file(tmp_path / "model.safetensors"))
  batch = oracles.random_batch(full.config.vocab_size, seed=8)
  _check_parity(tmp_path, full.get_encoder(), batch)


def test_unknown_or_contradicting_config_key(tmp_path, umt5):
  _, folder, _ = umt5
  bad = _copy(folder, tmp_path / "bad")
  raw = json.loads((bad / "config.json").read_text())
  for update, error in [
      ({"rope_theta": 10000.0}, r"config.json: unknown config key 'rope_theta'"),
      ({"dense_act_fn": "relu"}, "dense_act_fn='relu' contradicts feed_forward_proj"),
      ({"model_type": "bert"}, "model_type must be one of"),
      ({"architectures": ["T5EncoderModel"]}, "architectures of model_type 'umt5' must be among"),
      ({"is_decoder": True}, "only encoders"),
  ]:
    (bad / "config.json").write_text(json.dumps({**raw, **update}))
    with pytest.raises(ValueError, match=error):
      convert.load_text_encoder(bad)


def test_missing_shard(tmp_path):
  model = oracles.hf_encoder("umt5", seed=5)
  model.save_pretrained(tmp_path, max_shard_size="4KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shard = sorted(set(index["weight_map"].values()))[1]
  (tmp_path / shard).unlink()
  with pytest.raises(FileNotFoundError, match=f"shard .*{shard}.* does not exist"):
    convert.load_text_encoder(tmp_path)


def test_wrong_shape_fails_before_any_read(tmp_path, umt5, monkeypatch):
  _, folder, _ = umt5
  bad = _copy(folder, tmp_path / "bad")
  name = "encoder.block.2.layer.1.DenseReluDense.wo.weight"
  _rewrite(bad, lambda t: t.__setitem__(name, t[name][:, :-1].copy()))
  reads = []
  original = weights._Tensors.get
  monkeypatch.setattr(weights._Tensors, "get", lambda self, n: reads.append(n) or original(self, n))
  with pytest.raises(ValueError, match=rf"tensor '{name}' in .*bad/model.safetensors: expected shape "
                                       r"\(32, 40\), got \(32, 39\)"):
    convert.load_text_encoder(bad)
  assert reads == []


def test_unexpected_tensor(tmp_path, umt5):
  _, folder, _ = umt5
  bad = _copy(folder, tmp_path / "bad")
  _rewrite(bad, lambda t: t.__setitem__("encoder.extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r"unexpected \(1\): encoder.extra.weight"):
    convert.load_text_encoder(bad)


def test_missing_folder_or_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.load_text_encoder(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    convert.load_text_encoder(tmp_path)
