"""Multi-host for real: 2 processes x 4 CPU devices on loopback (gloo) against 1 process x 8."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import lm
from foundation import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"steps": 6, "checkpoint.every": 3, "eval.every": 3, "log.every": 1,
             "log.generate_tokens": 0, "optim.decay_steps": 6}


def write_corpus(folder) -> str:
  """Three small text files: too few to give each host its own, so hosts split rows."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")"]
  for i in range(3):
    text = " ".join(rng.choice(words, size=4000))
    with open(os.path.join(folder, f"doc{i}.txt"), "w") as f:
      f.write(text)
  return os.path.join(folder, "*.txt")


def records(workdir, split: str) -> dict[int, dict]:
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    if record.pop("split") == split:
      out[record["step"]] = record
  return out


def losses(workdir: str, split: str = "train") -> dict[int, float]:
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    if record["split"] == split:
      out[record["step"]] = record["loss"]
  return out


def run_two_processes(workdir: str, corpus: str, steps: int, **extra):
  overrides = {**OVERRIDES, "steps": steps, "data.source": f"files:{corpus}", **extra}
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "--",
       "--config", os.path.join(ROOT, "configs", "lm.py") + ":size=test", "--workdir", workdir,
       *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHON": sys.executable, "DEVICES_PER_PROCESS": "4"})
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result.stdout


def one_process_config(corpus: str, steps: int, **extra):
  config = lm.get_config("size=test")
  with config.unlocked():
    for dotted, value in {**OVERRIDES, "steps": steps, "data.source": f"files:{corpus}",
                          **extra}.items():
      group, _, key = dotted.rpartition(".")
      (config[group] if group else config)[key] = value
  return config


def write_tasks(folder) -> str:
  """evaluate.tasks: the trainer's periodic evaluators, a multiple-choice and a generation file."""
  quiz, pairs = os.path.join(folder, "quiz.jsonl"), os.path.join(folder, "pairs.jsonl")
  with open(quiz, "w") as f:
    for i in range(5):
      f.write(json.dumps({"context": f"def f{i}(x):", "choices": [" return x", " import", " )"],
                          "answer": 0}) + "\n")
  with open(pairs, "w") as f:
    for i in range(3):
      f.write(json.dumps({"source": f"for x{i} in", "target": " range"}) + "\n")
  return f"perplexity,mc:{quiz},gen:{pairs}"


def test_two_processes_match_one_process(tmp_path):
  corpus = write_corpus(tmp_path / "corpus")
  tasks = {"evaluate.every": 3, "evaluate.tasks": write_tasks(tmp_path),
           "evaluate.max_new_tokens": 4}
  out = run_two_processes(str(tmp_path / "two"), corpus, steps=6, **tasks)
  assert "2 process(es)" in out and "data=2 (1 in-slice x 2 across)" in out
  train.train(one_process_config(corpus, 6, **tasks), str(tmp_path / "one"))
  two, one = losses(str(tmp_path / "two")), losses(str(tmp_path / "one"))
  assert sorted(two) == sorted(one) == list(range(1, 7))
  np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)],
                             rtol=1e-5)
  np.testing.assert_allclose(list(losses(str(tmp_path / "two"), "eval").values()),
                             list(losses(str(tmp_path / "one"), "eval").values()), rtol=1e-5)
  # The task evaluators give the same figures on 2 processes as on 1 (steps 0, 3, 6).
  two_tasks, one_tasks = records(tmp_path / "two", "tasks"), records(tmp_path / "one", "tasks")
  assert sorted(two_tasks) == sorted(one_tasks) == [0, 3, 6]
  for step, one_record in one_tasks.items():
    assert set(two_tasks[step]) == set(one_record)
    assert one_record["mc/quiz/examples"] == 5 and one_record["gen/pairs/examples"] == 3
    for key, value in one_record.items():
      np.testing.assert_allclose(two_tasks[step][key], value, rtol=1e-5, err_msg=f"{step} {key}")
  # Every process wrote its own input position into the shared checkpoint.
  data_dir = tmp_path / "two" / "checkpoints" / "6" / "data"
  names = sorted(os.listdir(data_dir))
  assert any(n.startswith("process_0of2") for n in names)
  assert any(n.startswith("process_1of2") for n in names)


def prepare(corpus: str, output: str) -> str:
  result = subprocess.run(
      [sys.executable, "-m", "foundation.data.prepare", "--config",
       os.path.join(ROOT, "configs", "lm.py") + ":size=test", f"--config.data.source=files:{corpus}",
       "--output", output], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return f"prepared:{output}"


def test_runs_resume_from_each_others_checkpoints_across_host_counts(tmp_path):
  # Prepared data: its position is global, so it carries over to another host count.
  source = prepare(write_corpus(tmp_path / "corpus"), str(tmp_path / "prepared"))
  config = one_process_config("unused", 6)
  with config.unlocked():
    config.data.source = source
    config.eval.every = 0
  train.train(config, str(tmp_path / "uninterrupted"))
  expected = losses(str(tmp_path / "uninterrupted"))

  def two_processes(workdir, steps):
    args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "steps": steps, "eval.every": 0,
                                              "data.source": source}.items()]
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "--", "--config",
         os.path.join(ROOT, "configs", "lm.py") + ":size=test", "--workdir", workdir, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "DEVICES_PER_PROCESS": "4"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout

  # 2 processes x 4 devices stop at step 3; 1 process x 8 devices goes on to 6.
  two_then_one = str(tmp_path / "two_then_one")
  two_processes(two_then_one, 3)
  train.train(config, two_then_one)
  # 1 process stops at 3; 2 processes go on to 6.
  one_then_two = str(tmp_path / "one_then_two")
  with config.unlocked():
    config.steps = 3
  train.train(config, one_then_two)
  assert "resumed from the checkpoint at step 3" in two_processes(one_then_two, 6)

  for workdir in (two_then_one, one_then_two):
    got = losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)],
                               rtol=1e-5, err_msg=workdir)
