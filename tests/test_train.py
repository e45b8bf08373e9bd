"""The trainer end to end on 8 CPU devices: it learns, writes its workdir, and resumes exactly."""

import glob
import json
import os
import subprocess
import sys

import numpy as np

from configs import lm
from foundation import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir: str, split: str) -> dict[int, dict]:
  """metrics.jsonl as {step: record} for one split (a later record of a step wins)."""
  records = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == split:
        records[record["step"]] = record
  return records


def small_run_config(steps: int, **changes):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.steps = steps
    config.optim.decay_steps = 12  # the schedule must not depend on where a run stops
    config.checkpoint.every = 4
    config.eval.every = 0
    config.log.every = 1
    config.log.generate_tokens = 0
    for key, value in changes.items():
      config[key] = value
  return config


def test_resumed_run_reaches_the_same_losses(tmp_path):
  uninterrupted = str(tmp_path / "uninterrupted")
  train.train(small_run_config(12), uninterrupted)

  interrupted = str(tmp_path / "interrupted")
  train.train(small_run_config(6), interrupted)   # stops after step 6 (checkpoints at 4 and 6)
  assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["4", "6"]
  train.train(small_run_config(12), interrupted)  # resumes from step 6

  expected = read_metrics(uninterrupted, "train")
  resumed = read_metrics(interrupted, "train")
  assert sorted(resumed) == sorted(expected) == list(range(1, 13))
  for step in range(1, 13):
    assert resumed[step]["loss"] == expected[step]["loss"], step
    assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step


def test_demo_config_learns_on_the_embedded_corpus(tmp_path):
  # The demo (size=tiny, the embedded corpus) with a shorter schedule, to keep the suite short.
  config = lm.get_config("size=tiny")
  with config.unlocked():
    config.steps = 60
    config.optim.warmup_steps = 10
    config.eval.every = 60
    config.eval.steps = 4
    config.log.every = 20
    config.checkpoint.every = 60
    config.log.generate_tokens = 16
  workdir = str(tmp_path / "demo")
  result = train.train(config, workdir)
  evals = read_metrics(workdir, "eval")
  assert sorted(evals) == [0, 60]
  assert evals[60]["loss"] <= 0.7 * evals[0]["loss"], evals
  assert result["eval"]["loss"] == evals[60]["loss"]


def test_the_command_line_run_writes_a_complete_workdir(tmp_path):
  workdir = tmp_path / "cli"
  config_file = os.path.join(ROOT, "configs", "lm.py")
  result = subprocess.run(  # a relative --workdir, as users type it
      [sys.executable, "-m", "foundation.train", "--config", f"{config_file}:size=test",
       "--workdir", "cli", "--config.steps=12", "--config.checkpoint.keep=2",
       "--config.checkpoint.every=4"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "mesh (data=1, fsdp=8, sequence=1, tensor=1) over 8 cpu devices, 1 slice(s)" in out
  assert "started from scratch" in out
  assert "--- greedy continuation of 'def fibonacci(n):\\n'" in out

  # config.json, the last `keep` checkpoints, TensorBoard events and metrics.jsonl.
  config = json.loads((workdir / "config.json").read_text())
  assert config["steps"] == 12 and config["model"]["d_model"] == 64
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "8"]
  for step_dir in ("8", "12"):
    assert {"state", "data", "meta"} <= set(os.listdir(workdir / "checkpoints" / step_dir))
  assert glob.glob(str(workdir / "events.out.tfevents.*"))
  train_records = read_metrics(str(workdir), "train")
  assert sorted(train_records) == list(range(1, 13))
  for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time"):
    assert np.isfinite(train_records[12][key]), key
  assert set(read_metrics(str(workdir), "eval")) == {0, 10, 12}

  # Run again: already at the last step, it resumes and only prints the sample.
  again = subprocess.run(
      [sys.executable, "-m", "foundation.train", "--config", f"{config_file}:size=test",
       "--workdir", "cli", "--config.steps=12"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from the checkpoint at step 12" in again.stdout
