"""Bad input is one line naming the source or file: input with nothing to learn from, and files
that are damaged or not what they claim to be (met at set-up or in the middle of training)."""

import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from configs import lm
from foundation.data import classify
from foundation.data import documents
from foundation.data import pipeline
from foundation.data import prepare
from foundation.data import prepared
from foundation.data import sft
from foundation.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(**data):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.data.update(data)
  return config


def write(folder, name: str, contents: bytes | str) -> str:
  path = os.path.join(folder, name)
  with open(path, "wb") as f:
    f.write(contents.encode() if isinstance(contents, str) else contents)
  return path


def empty_tfrecord(folder, name: str) -> str:
  path = os.path.join(folder, name)
  with tf.io.TFRecordWriter(path):
    pass
  return path


# ------------------------------------------------------------------ nothing to learn from

def test_sources_with_no_text_are_one_line_errors_naming_the_source(tmp_path):
  cases = {  # folder: (files, what the error says)
      "empty": ({f"{i}.txt": "" for i in range(3)}, r"2 document\(s\), all empty"),
      "blank": ({f"{i}.txt": " \n\t\n" for i in range(3)}, "whitespace-only"),
      "fields": ({f"{i}.jsonl": '{"text": ""}\n{"text": "  "}\n' for i in range(3)},
                 r"field data.text_feature='text'"),
      "nolines": ({f"{i}.jsonl": "\n" for i in range(3)}, "holds no documents"),
  }
  for folder, (files, message) in cases.items():
    os.makedirs(tmp_path / folder)
    for name, contents in files.items():
      write(tmp_path / folder, name, contents)
    ext = next(iter(files)).rsplit(".", 1)[1]
    source = f"files:{tmp_path / folder}/*.{ext}"
    with pytest.raises(ValueError, match=rf"data.source='{re.escape(source)}': no text to train on: .*{message}"):
      pipeline.make_train_iterator(config_for(source=source), 0, 1)
  os.makedirs(tmp_path / "records")
  for i in range(3):
    empty_tfrecord(tmp_path / "records", f"{i}.tfrecord")
  with pytest.raises(ValueError, match=r"no text to train on: the train split \(2 tfrecord file"):
    pipeline.make_train_iterator(config_for(source=f"files:{tmp_path}/records/*.tfrecord"), 0, 1)
  # A mixture names the source that is empty, not just "the data".
  os.makedirs(tmp_path / "good")
  for i in range(3):
    write(tmp_path / "good", f"{i}.txt", "print('hello')\n" * 50)
  mixture = f"files:{tmp_path}/good/*.txt:0.5,files:{tmp_path}/empty/*.txt:0.5"
  with pytest.raises(ValueError, match=rf"^data.mixture source 'files:{tmp_path}/empty/\*.txt': no "):
    pipeline.make_train_iterator(config_for(mixture=mixture), 0, 1)
  # A source too large to peek at whole is caught by its first batch (only BOS/EOS in it).
  peek, documents.PEEK_DOCUMENTS = documents.PEEK_DOCUMENTS, 2
  try:
    it = pipeline.make_train_iterator(config_for(source=f"files:{tmp_path}/empty/*.txt"), 0, 1)
    with pytest.raises(ValueError, match="no text to train on: the first batch of .* holds only"):
      next(it)
  finally:
    documents.PEEK_DOCUMENTS = peek


def test_prepared_sft_and_classify_data_with_no_text_are_errors(tmp_path):
  os.makedirs(tmp_path / "empty")
  for i in range(4):
    write(tmp_path / "empty", f"{i}.txt", "")
  config = config_for(source=f"files:{tmp_path}/empty/*.txt")
  prepare.prepare(config, str(tmp_path / "prepared"), log=lambda _: None)
  run = config_for(source=f"prepared:{tmp_path}/prepared")
  with pytest.raises(ValueError, match=r"no text to train on: the train split holds 3 document"):
    pipeline.make_train_iterator(run, 0, 1)

  chats = write(tmp_path, "chat.jsonl", "".join(
      json.dumps({"prompt": f"q{i}", "response": ""}) + "\n" for i in range(6)))
  config = lm.get_config("size=test")
  with config.unlocked():
    config.sft = {"train_path": chats, "eval_path": "", "eval_fraction": 0.0,
                  "overlong": "truncate"}
  with pytest.raises(ValueError, match=r"sft.train_path=.*: no text to train on: the assistant "
                                       r"answers of all 6 train records are empty"):
    sft.make_sft_iterator(config, 0, 1)

  rows = write(tmp_path, "rows.csv", "text,label\n" + "".join(f",{i % 2}\n" for i in range(6)))
  config = lm.get_config("size=test")
  with config.unlocked():
    config.model.num_classes = 2
    config.classify = {"train_path": rows, "eval_path": "", "eval_fraction": 0.0,
                       "train_split": "train", "eval_split": "test", "text_field": "text",
                       "label_field": "label", "labels": "", "truncate": "right"}
  with pytest.raises(ValueError, match=r"classify.train_path=.*: no text to classify"):
    classify.ClassifyData(config)


# ------------------------------------------------------------------ damaged files

def test_damaged_tokenizer_files_are_one_line_errors(tmp_path):
  garbage = write(tmp_path, "garbage.model", os.urandom(300))
  with pytest.raises(ValueError, match=r"data.tokenizer='.*garbage.model' is not a SentencePiece "
                                       r"model \(its 300 bytes"):
    tokenizers.make_tokenizer(garbage)
  broken = write(tmp_path, "tokenizer.json", '{"model": ')
  with pytest.raises(ValueError, match=r"tokenizer.json' is not a Hugging Face tokenizer.json: EOF"):
    tokenizers.make_tokenizer(broken)
  os.makedirs(tmp_path / "side")
  for name, contents in tokenizers.byte_tokenizer_files().items():
    write(tmp_path / "side", name, contents)
  write(tmp_path / "side", "tokenizer_config.json", "{not json")
  with pytest.raises(ValueError, match=r"tokenizer_config.json \(beside data.tokenizer=.*\) is not "
                                       r"JSON"):
    tokenizers.make_tokenizer(str(tmp_path / "side" / "tokenizer.json"))


def run_command(*args, timeout=600):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_bad_jsonl_line_met_mid_training_is_one_line(tmp_path):
  """With several files the bad line is met by the train iterator during the steps (with one
  file, by the eval split at set-up): both print one line, never a traceback."""
  for i in range(3):
    lines = [json.dumps({"text": f"line {j} of file {i} " * 3}) for j in range(40)]
    write(tmp_path, f"{i}.jsonl", "\n".join(lines + ['{"text": "unterminated']) + "\n")
  result = run_command(
      "foundation.train", "--config", "configs/lm.py:size=test", "--workdir",
      str(tmp_path / "run"), f"--config.data.source=files:{tmp_path}/*.jsonl",
      "--config.eval.every=0", "--config.steps=40", "--config.log.generate_tokens=0",
      timeout=300)  # before the fix, a traceback and then a hang at exit
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("config error: data error: ") and ".jsonl:41 is not a JSON line" in last


def test_unknown_config_size_is_one_line(tmp_path):
  result = run_command("foundation.train", "--config", "configs/lm.py:size=tinny", "--workdir",
                       str(tmp_path / "run"), timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines() == [
      "config error: --config=configs/lm.py:size=tinny: config argument size='tinny' is unknown "
      "(did you mean 'tiny'?); sizes: test, tiny, 125m, 350m, 1b, 3b, 7b, 13b, 70b"]
