"""A Hugging Face tokenizer.json as the data pipeline's tokenizer: packing, the workdir's copy,
prepared data and a training run that resumes only with the same file."""

import json

import numpy as np
import pytest
import tensorflow as tf

from foundation import config as config_lib
from foundation import data
from foundation import train
from foundation.data import prepare
from test_data import make_config, take, write_corpus
from test_data_resume import run_config

tokenizers = pytest.importorskip("tokenizers")


def write_tokenizer_json(folder, texts, vocab_size: int = 300, eos: str = "<|eot_id|>") -> str:
  """A byte-level BPE tokenizer.json trained here (no download), with a tokenizer_config.json that
  names an instruct model's EOS, as Llama 3's does."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
  return str(folder / "tokenizer.json")


def test_packing_with_a_tokenizer_json_keeps_every_document_with_its_own_special_ids(tmp_path):
  texts = write_corpus(tmp_path / "corpus", 12)
  path = write_tokenizer_json(tmp_path / "tok", texts)
  tok = data.make_tokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 2)  # the file's ids, not ours
  batched = tok.tf_encode_batch(tf.constant([t.encode() for t in texts[:3]]))
  for i, text in enumerate(texts[:3]):  # the batched in-graph path encodes as encode() does
    assert batched[i].numpy().tolist() == tok.encode(text) == tok.tf_encode(
        tf.constant(text.encode())).numpy().tolist()
  config = make_config(f"files:{tmp_path}/corpus/**/*.txt", tokenizer=path, eval_fraction=0.0,
                       shuffle_buffer=1)
  batches = take(data.make_train_iterator(config, 0, 1), 4)
  inputs = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
  mask = np.concatenate([b["loss_mask"].reshape(-1) for b in batches]).astype(bool)
  # Each document is [bos] + ids as input, ids + [eos] as target; every epoch has them all.
  documents = [d for d in np.split(inputs[mask], np.flatnonzero(inputs[mask] == tok.bos_id)) if
               len(d)]
  decoded = {tok.decode(d) for d in documents}
  assert set(texts) <= decoded
  ends, starts = np.sum(targets[mask] == tok.eos_id), np.sum(inputs[mask] == tok.bos_id)
  assert ends in (starts, starts - 1)  # the last document may go on past the batches taken


def test_the_workdir_and_prepared_data_keep_the_tokenizer_json(tmp_path):
  texts = write_corpus(tmp_path / "corpus", 8)
  paths = [write_tokenizer_json(tmp_path / "a", texts),
           write_tokenizer_json(tmp_path / "b", texts, eos="<|end_of_text|>")]
  a, b = (data.make_tokenizer(p) for p in paths)
  fa, fb = data.tokenizer_fingerprint(a, paths[0]), data.tokenizer_fingerprint(b, paths[1])
  assert fa["kind"] == "hf" and fa["file"] == "tokenizer.json" and fa["sha256"] != fb["sha256"]
  workdir = tmp_path / "run"
  data.store_tokenizer(a, paths[0], str(workdir), write=True)
  assert (workdir / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
  assert json.loads((workdir / "tokenizer_config.json").read_text())["eos_token"] == "<|eot_id|>"
  # The workdir's copy is the same tokenizer (special ids from its own tokenizer_config.json).
  copy = data.make_tokenizer(str(workdir / "tokenizer.json"))
  assert data.tokenizer_fingerprint(copy)["sha256"] == fa["sha256"] and copy.eos_id == a.eos_id
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"\(hf, vocab 300, sha256 .*is not the tokenizer of this "
                                       r"workdir's checkpoints, .*tokenizer.json"):
    data.store_tokenizer(b, paths[1], str(workdir), write=True)

  config = make_config(f"files:{tmp_path}/corpus/**/*.txt", tokenizer=paths[0], eval_fraction=0.0)
  prepare.prepare(config, str(tmp_path / "prepared"))
  assert (tmp_path / "prepared" / "tokenizer.json").exists()
  manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
  assert manifest["tokenizer"]["sha256"] == fa["sha256"] and manifest["bos_id"] == a.bos_id
  prepared = make_config(f"prepared:{tmp_path}/prepared", tokenizer=paths[0])
  assert next(data.make_train_iterator(prepared, 0, 1))["inputs"].max() < a.vocab_size
  with pytest.raises(ValueError, match=r"train with --config.data.tokenizer=.*prepared/tokenizer"
                                       r".json"):
    data.make_train_iterator(make_config(f"prepared:{tmp_path}/prepared", tokenizer=paths[1]), 0, 1)


def test_a_training_run_reads_a_tokenizer_json_and_refuses_another_on_resume(tmp_path):
  texts = write_corpus(tmp_path / "corpus", 8)
  paths = [write_tokenizer_json(tmp_path / "a", texts),
           write_tokenizer_json(tmp_path / "b", texts, eos="<|end_of_text|>")]
  source = f"files:{tmp_path}/corpus/**/*.txt"
  workdir = tmp_path / "run"
  result = train.train(run_config(2, **{"data.source": source, "data.tokenizer": paths[0]}),
                       str(workdir))
  assert np.isfinite(result["train"]["loss"])
  assert (workdir / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
  meta = json.loads((workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())
  assert meta["data"]["tokenizer"]["kind"] == "hf"
  with pytest.raises(config_lib.ConfigError, match=r"data.tokenizer=.*b/tokenizer.json.* is not "
                                                   r"the tokenizer of this workdir's checkpoints"):
    train.train(run_config(3, **{"data.source": source, "data.tokenizer": paths[1]}), str(workdir))
