"""Prepared data: the prepare command, its manifest, every row once per epoch, exact resume on
any host count, prepared mixtures, the bench command, and nothing half-written on errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from foundation import data
from foundation.data import bench
from foundation.data import prepare
from foundation.data import prepared
from foundation.data import sources
from foundation import tokenizer as tokenizer_cli
from test_data import ROOT, assert_batches_equal, make_config, take, write_corpus


def prepare_corpus(tmp_path, name: str, count: int = 30, seed: int = 0, **fields) -> str:
  """Writes a corpus and prepares it in-process; returns 'prepared:DIR'."""
  write_corpus(tmp_path / f"{name}-text", count, seed=seed)
  config = make_config(f"files:{tmp_path}/{name}-text/**/*.txt", eval_fraction=0.2, **fields)
  prepare.prepare(config, str(tmp_path / name), shard_tokens=500, log=lambda _: None)
  return f"prepared:{tmp_path / name}"


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  """40 documents prepared with small shards (several files)."""
  root = tmp_path_factory.mktemp("prep")
  texts = write_corpus(root / "text", 40)
  config = make_config(f"files:{root}/text/**/*.txt", eval_fraction=0.2)
  prepare.prepare(config, str(root / "out"), shard_tokens=700, log=lambda _: None)
  return str(root / "out"), root, texts


def test_the_prepare_command(tmp_path):
  write_corpus(tmp_path / "text", 6)
  result = subprocess.run(
      [sys.executable, "-m", "foundation.data.prepare", "--config", "configs/lm.py:size=test",
       f"--config.data.source=files:{tmp_path}/text/**/*.txt", "--output", str(tmp_path / "out")],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"--config.data.source=prepared:{tmp_path / 'out'}" in result.stdout
  assert "train: 5 documents" in result.stdout  # and one held out for eval
  again = subprocess.run(result.args, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 1 and "prepare error: --output" in again.stderr


def test_the_prepared_stream_holds_every_train_document_once_in_order(prepared_dir):
  directory, root, _ = prepared_dir
  manifest = json.load(open(os.path.join(directory, "manifest.json")))
  assert sorted(os.listdir(directory)) == sorted(["manifest.json"] + [
      s["file"] for split in manifest["splits"].values() for s in split["shards"]])
  train = manifest["splits"]["train"]
  assert len(train["shards"]) > 2 and manifest["dtype"] == "uint16"
  assert manifest["tokenizer"]["kind"] == "byte" and len(manifest["fingerprint"]) == 64
  config = make_config(f"files:{root}/text/**/*.txt", eval_fraction=0.2)
  tok = data.make_tokenizer("byte")
  expected = [1]
  files = sources.file_split(config, "train")
  for path in files:
    expected[-1:] = [1] + tok.encode(open(path, encoding="utf-8").read()) + [1]
  split = prepared.PreparedSplit(directory, train)
  np.testing.assert_array_equal(split.slice(0, split.tokens + 1), expected)
  assert train["documents"] == len(files) and train["tokens"] == len(expected) - 1


def test_an_epoch_of_prepared_rows_holds_every_row_exactly_once(prepared_dir):
  directory, _, _ = prepared_dir
  config = make_config(f"prepared:{directory}")
  split = prepared.PreparedSplit(directory, prepared.load_manifest(
      sources.parse_source(config.data.source))["splits"]["train"])
  rows = split.rows(32)
  windows = split.windows(np.arange(rows), 32)
  expected = sorted(map(tuple, windows[:, :-1]))
  batches = take(data.make_train_iterator(config, 0, 1), -(-2 * rows // 16))
  inputs = np.concatenate([b["inputs"] for b in batches])
  assert sorted(map(tuple, inputs[:rows])) == expected          # epoch 1: each row once
  assert sorted(map(tuple, inputs[rows:2 * rows])) == expected  # epoch 2: each row once again
  assert not np.array_equal(inputs[:rows], inputs[rows:2 * rows])  # in a fresh order
  for n in (1, 2, 3, 17, 1000, 4097):  # the keyed permutation behind it is a bijection
    assert sorted(prepared.permute(np.arange(n), n, prepared.epoch_keys(0, 0, 1))) == list(range(n))


def test_prepared_rows_have_the_on_the_fly_contract(prepared_dir):
  directory, _, _ = prepared_dir
  batch = next(data.make_train_iterator(make_config(f"prepared:{directory}"), 0, 1))
  inputs, targets, segments = batch["inputs"], batch["targets"], batch["segment_ids"]
  assert all(v.shape == (16, 32) and v.dtype == np.int32 for v in batch.values())
  new_segment = np.concatenate([np.ones((16, 1), bool), inputs[:, 1:] == 1], axis=1)
  np.testing.assert_array_equal(segments, np.cumsum(new_segment, axis=1))
  np.testing.assert_array_equal(batch["positions"] == 0, new_segment)
  same = segments[:, 1:] == segments[:, :-1]
  np.testing.assert_array_equal(targets[:, :-1][same], inputs[:, 1:][same])
  np.testing.assert_array_equal(targets[:, :-1][~same], 2)  # eos ends each document
  np.testing.assert_array_equal(batch["loss_mask"], 1)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 2), (2, 1), (1, 2)])
def test_a_prepared_position_resumes_exactly_on_any_host_count(prepared_dir, tmp_path, saved_on,
                                                               resumed_on):
  config = make_config(f"prepared:{prepared_dir[0]}")
  single = data.make_train_iterator(config, 0, 1)
  take(single, 7)
  expected = np.concatenate([b["inputs"] for b in take(single, 50)])  # the global rows, in order
  saving = [data.make_train_iterator(config, p, saved_on) for p in range(saved_on)]
  for it in saving:
    take(it, 7)
    it.save(str(tmp_path))
  hosts = []
  for p in range(resumed_on):
    it = data.make_train_iterator(config, p, resumed_on)
    it.restore(str(tmp_path))
    hosts.append(take(it, 50))
  # Step by step, the hosts' rows put together are the global batch: none repeated or skipped.
  got = np.concatenate([np.concatenate([h[s]["inputs"] for h in hosts]) for s in range(50)])
  np.testing.assert_array_equal(got, expected)
  if saved_on == resumed_on:
    assert_batches_equal(hosts[0], take(saving[0], 50))


def test_a_prepared_mixture_keeps_its_shares_and_resumes(tmp_path):
  a = prepare_corpus(tmp_path, "a", seed=1)
  b = prepare_corpus(tmp_path, "b", seed=2)
  config = make_config(mixture=f"{a}:0.75,{b}:0.25")
  it = data.make_train_iterator(config, 0, 1)
  take(it, 5)
  assert sorted(it.metrics().values()) == [0.25, 0.75]
  it.save(str(tmp_path))
  resumed = data.make_train_iterator(config, 0, 1)
  resumed.restore(str(tmp_path))
  assert_batches_equal(take(it, 50), take(resumed, 50))
  other = data.make_train_iterator(make_config(mixture=f"{a}:0.5,{b}:0.5"), 0, 1)
  with pytest.raises(ValueError, match=r"other prepared data or settings \(slots"):
    other.restore(str(tmp_path))


def test_prepared_data_made_with_another_tokenizer_or_vocab_is_an_error(tmp_path, prepared_dir):
  texts = [open(p).read() for p in sorted((prepared_dir[1] / "text").glob("*.txt"))]
  sp_path = tmp_path / "sp.model"
  sp_path.write_bytes(tokenizer_cli.train_sentencepiece(texts, 300))
  config = make_config(f"prepared:{prepared_dir[0]}", tokenizer=str(sp_path))
  with pytest.raises(ValueError, match=r"data.tokenizer='.*sp.model' \(sentencepiece, vocab \d+, "
                                       r"sha256 \w{12}\) is not the tokenizer .* prepared with "
                                       r"\(byte, vocab 259\); train with .*=byte"):
    data.make_train_iterator(config, 0, 1)
  # Ids past the model's vocabulary (data made for a bigger model): refused before training.
  copy = shutil.copytree(prepared_dir[0], tmp_path / "copy")
  manifest = json.loads((copy / "manifest.json").read_text())
  (copy / "manifest.json").write_text(json.dumps({**manifest, "max_id": 400}))
  with pytest.raises(ValueError, match=r"holds token id 400, beyond model.vocab_size=384"):
    data.make_eval_batches(make_config(f"prepared:{copy}"), 0, 1)


def test_prepare_leaves_nothing_half_written(tmp_path):
  write_corpus(tmp_path / "text", 12)
  (tmp_path / "text" / "zz-latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  config = make_config(f"files:{tmp_path}/text/**/*.txt", eval_fraction=0.0)
  with pytest.raises(ValueError, match=r"zz-latin1.txt is not UTF-8 text \(data.invalid_utf8="):
    prepare.prepare(config, str(tmp_path / "out"), log=lambda _: None)
  assert sorted(os.listdir(tmp_path)) == ["text"]  # no output, no .partial folder
  config.data.invalid_utf8 = "skip"
  manifest = prepare.prepare(config, str(tmp_path / "out"), log=lambda _: None)
  assert manifest["splits"]["train"]["skipped_documents"] == 1
  assert manifest["splits"]["train"]["documents"] == 12 and "eval" not in manifest["splits"]
  with pytest.raises(ValueError, match=r"--output .*out exists"):
    prepare.prepare(config, str(tmp_path / "out"))
  with pytest.raises(ValueError, match=r"no manifest.json in .*text"):
    data.make_train_iterator(make_config(f"prepared:{tmp_path}/text"), 0, 1)


def test_bench_reports_every_stage(prepared_dir):
  config = make_config(f"prepared:{prepared_dir[0]}")
  results = bench.run(config, seconds=0.05)
  assert set(results[config.data.source]) == {"read", "pack"} and results["batch"] > 0
  config = make_config(f"files:{prepared_dir[1]}/text/**/*.txt", shuffle_buffer=16)
  stages = bench.run(config, seconds=0.05)[config.data.source]
  assert all(stages[s] > 0 for s in ("read", "tokenize", "pack")) and stages["bytes_per_token"] > 0


def test_prepared_data_trains_without_tensorflow(prepared_dir):
  code = ("import sys; from configs import lm; from foundation import data\n"
          "c = lm.get_config('size=test').unlock()\n"
          f"c.data.source = 'prepared:{prepared_dir[0]}'\n"
          "b = next(data.make_train_iterator(c, 1, 2)); e = data.make_eval_batches(c, 1, 2)\n"
          "assert b['inputs'].shape == (8, 32) and e[0]['inputs'].shape == (8, 32)\n"
          "assert 'tensorflow' not in sys.modules, 'the prepared source imported tensorflow'\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
