"""Workdirs are portable: config.json names the workdir's own tokenizer copy relative to it, so a
moved workdir (its original tokenizer file gone) still generates, exports and resumes."""

import json
import os
import shutil

from configs import lm
from foundation import generate
from foundation import hf
from foundation import tokenizer as tokenizer_cli
from foundation import train
from foundation import workdir as workdir_lib
from foundation.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "class Point:\n    x: int\n    y: int\n"] * 20


def run_config(steps: int, corpus: str, sp_model: str):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.steps = steps
    config.checkpoint.every = 2
    config.eval.every = 0
    config.log.generate_tokens = 0
    config.data.source = f"files:{corpus}/*.py"
    config.data.tokenizer = sp_model
  return config


def test_moved_workdir_with_a_sentencepiece_tokenizer_generates_and_resumes(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, text in enumerate(TEXTS[:6]):
    (corpus / f"f{i}.py").write_text(text * 20)
  sp_model = tmp_path / "sp" / "sp.model"
  sp_model.parent.mkdir()
  sp_model.write_bytes(tokenizer_cli.train_sentencepiece(TEXTS, 300))
  first = str(tmp_path / "first")
  train.train(run_config(2, str(corpus), str(sp_model)), first)
  saved = json.load(open(os.path.join(first, "config.json")))
  assert saved["data"]["tokenizer"] == "tokenizer.model"  # the workdir's copy, relative

  moved = str(tmp_path / "elsewhere" / "moved")
  shutil.move(first, moved)
  shutil.rmtree(sp_model.parent)  # the original tokenizer is gone: only the copy is left
  config = generate.load_config(moved)
  assert config.data.tokenizer == os.path.join(moved, "tokenizer.model")
  session = generate.load(moved)
  assert session.step == 2 and session.tokenizer.encode("def f") == \
      tokenizers.make_tokenizer(os.path.join(moved, "tokenizer.model")).encode("def f")
  # Resume with the run's own command line (its --config.data.tokenizer now names nothing).
  train.train(run_config(4, str(corpus), str(sp_model)), moved)
  assert sorted(os.listdir(os.path.join(moved, "checkpoints")))[-1] == "4"


def test_moved_import_with_a_tokenizer_json_loads_and_exports(tmp_path):
  source = tmp_path / "hf"
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "llama_gqa"), source)
  for name, contents in tokenizers.byte_tokenizer_files().items():  # any tokenizer.json will do
    (source / name).write_bytes(contents)
  first = str(tmp_path / "imported")
  hf.import_checkpoint(str(source), first, template="test", dtype="float32", params_only=True)
  assert json.load(open(os.path.join(first, "config.json")))["data"]["tokenizer"] == \
      "tokenizer.json"
  moved = str(tmp_path / "moved")
  shutil.move(first, moved)
  shutil.rmtree(source)
  session = generate.load(moved)
  assert session.tokenizer.path == os.path.join(moved, "tokenizer.json")
  assert session.tokenizer.encode("hi") == [ord("h") + 3, ord("i") + 3]
  out = str(tmp_path / "export")
  hf.export_checkpoint(moved, out)
  assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_portable_and_resolve_round_trip(tmp_path):
  """Old config.json files hold absolute paths: a missing one falls back to the workdir's copy."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "tokenizer.model").write_bytes(b"x")
  gone = str(tmp_path / "gone" / "sp.model")
  assert workdir_lib.resolve_tokenizer(gone, str(workdir)) == str(workdir / "tokenizer.model")
  assert workdir_lib.portable({"data": {"tokenizer": gone}}, str(workdir)) == \
      {"data": {"tokenizer": "tokenizer.model"}}
  assert workdir_lib.resolve_tokenizer("byte", str(workdir)) == "byte"
  assert workdir_lib.resolve_tokenizer(str(tmp_path / "x.json"), str(workdir)) == \
      str(tmp_path / "x.json")  # no copy of that kind: left for make_tokenizer to report
