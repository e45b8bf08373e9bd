"""Resuming a run: a SIGKILLed trainer restarts onto the uninterrupted run's losses; resumes with
another tokenizer, vocabulary or host count are refused clearly; eval is host-count free."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import lm
from foundation import config as config_lib
from foundation import data
from foundation import step as step_lib
from foundation import tokenizer as tokenizer_cli
from foundation import train
from test_data import ROOT, make_config, take, write_corpus

RUN = {"optim.decay_steps": 12, "checkpoint.every": 4, "eval.every": 0, "log.every": 1,
       "log.generate_tokens": 0, "data.eval_fraction": 0.0}


def run_config(steps: int, **fields):
  config = lm.get_config("size=test").unlock()
  config.steps = steps
  for dotted, value in {**RUN, **fields}.items():
    node, *path, last = [config] + dotted.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def losses(workdir) -> dict[int, float]:
  """{step: train loss} from metrics.jsonl; a later record of a step wins."""
  records, path = {}, os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line torn by the kill
        continue
      if record.get("split") == "train":
        records[record["step"]] = record["loss"]
  return records


def command(workdir, steps: int, **fields) -> list[str]:
  flags = [f"--config.{k}={v}" for k, v in {**RUN, **fields}.items()]
  return [sys.executable, "-m", "foundation.train", "--config", "configs/lm.py:size=test",
          "--workdir", str(workdir), f"--config.steps={steps}", *flags]


def test_a_killed_run_restarts_onto_the_uninterrupted_losses(tmp_path):
  """The run is SIGKILLed once it has logged 16 steps (mid-flight: it was asked for 100,000), so
  its own log is the uninterrupted reference. Dropping its checkpoints after step 4 makes it a run
  killed right after the step-4 checkpoint, which the restart must carry on exactly."""
  write_corpus(tmp_path / "corpus", 12)
  mixture = f"embedded:0.7,files:{tmp_path}/corpus/**/*.txt:0.3"
  workdir = tmp_path / "killed"
  with open(tmp_path / "killed.log", "w") as log:
    run = subprocess.Popen(command(workdir, 100_000, **{"data.mixture": mixture}), cwd=ROOT,
                           stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while run.poll() is None and time.time() < deadline and not (
      (workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists()  # complete: renamed in
      and max(losses(workdir), default=0) >= 16):
    time.sleep(0.05)
  run.send_signal(signal.SIGKILL)
  assert run.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
  expected = losses(workdir)
  for step in os.listdir(workdir / "checkpoints"):
    if step.isdigit() and int(step) > 4:
      shutil.rmtree(workdir / "checkpoints" / step)

  restart = subprocess.run(command(workdir, 16, **{"data.mixture": mixture}), cwd=ROOT,
                           capture_output=True, text=True, timeout=300, check=False)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert "resumed from the checkpoint at step 4" in restart.stdout
  got = losses(workdir)  # steps 5..16 now come from the restarted run
  assert [got[s] for s in range(1, 17)] == [expected[s] for s in range(1, 17)]
  assert all(f"train step {s:>6}" in restart.stdout for s in range(5, 17))

  # Resuming with another tokenizer stops before any compile: the workdir's config.json names
  # the field (the checkpoint's own record of its tokenizer is checked next: see below).
  sp_path = tmp_path / "sp.model"
  texts = [p.read_text() for p in sorted((tmp_path / "corpus").glob("*.txt"))]
  sp_path.write_bytes(tokenizer_cli.train_sentencepiece(texts, 300))
  other = run_config(20, **{"data.mixture": mixture, "data.tokenizer": str(sp_path)})
  with pytest.raises(config_lib.ConfigError, match=(
      r"was written by another config; these fields differ from its config.json: "
      r"data.tokenizer: 'byte' -> '.*sp.model'")):
    train.train(other, str(workdir))
  assert not (workdir / "tokenizer.model").exists()  # the checkpoints' workdir is left as it was


def description(**changes) -> dict:
  it = data.make_train_iterator(make_config("synthetic"), 0, 1)
  return {**it.description(), "position_kind": "tf.data", **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(model_vocab_size=512), r"model.vocab_size=384 but the checkpoint at step 8 was trained "
                                 r"with 512; resume with --config.model.vocab_size=512"),
    (dict(seq_len=64), r"seq_len=32 but the checkpoint at step 8 was trained with 64"),
    (dict(sources=[["embedded", 1.0]]), r"the data differs from the checkpoint at step 8's"),
    (dict(process_count=2), r"the checkpoint at step 8 holds the input position of 2 process\(es\),"
                            r" but this run has 1: the on-the-fly input .* Resume with 2 process"),
])
def test_resuming_onto_other_data_settings_is_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    data.check_resume(description(**changes), description(), 8)
  data.check_resume(description(), description(), 8)  # the same settings pass
  data.check_resume(None, description(), 8)            # as do checkpoints from before the check
  for kind in ("prepared", "tf.data-global"):  # one global position: any host count
    data.check_resume(description(position_kind=kind, process_count=2),
                      description(position_kind=kind), 8)
  with pytest.raises(ValueError, match=r"read its input as 'tf.data-global', this run as 'tf.data'"):
    data.check_resume(description(position_kind="tf.data-global"), description(), 8)


def test_a_per_host_position_refuses_another_host_count(tmp_path):
  config = make_config("embedded", shuffle_buffer=8)  # 700 files: each host reads its own
  for p in (0, 1):
    data.make_train_iterator(config, p, 2).save(str(tmp_path))
  with pytest.raises(ValueError, match=r"holds the input position of 2 process\(es\), but this run "
                                       r"has 1: the on-the-fly input \(embedded\)"):
    data.make_train_iterator(config, 0, 1).restore(str(tmp_path))


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_a_global_position_resumes_on_another_host_count(tmp_path, saved_on, resumed_on):
  write_corpus(tmp_path / "corpus", 6)  # few files: every host runs the same global pipeline
  config = make_config(f"files:{tmp_path}/corpus/**/*.txt", shuffle_buffer=32)
  single = data.make_train_iterator(config, 0, 1)
  take(single, 5)
  expected = take(single, 20)
  (tmp_path / "ckpt").mkdir()
  for p in range(saved_on):
    it = data.make_train_iterator(config, p, saved_on)
    take(it, 5)
    it.save(str(tmp_path / "ckpt"))
  hosts = []
  for p in range(resumed_on):
    it = data.make_train_iterator(config, p, resumed_on)
    it.restore(str(tmp_path / "ckpt"))
    hosts.append(take(it, 20))
  for step, batch in enumerate(expected):  # the global batches, split over the new host count
    np.testing.assert_array_equal(
        batch["inputs"], np.concatenate([h[step]["inputs"] for h in hosts]))


def test_the_workdir_keeps_the_sentencepiece_model_its_checkpoints_need(tmp_path):
  texts = ["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20]
  models = []
  for i, size in enumerate((280, 290)):
    path = tmp_path / f"sp{i}.model"
    path.write_bytes(tokenizer_cli.train_sentencepiece(texts, size))
    models.append((data.make_tokenizer(str(path)), str(path)))
  workdir = tmp_path / "run"
  data.store_tokenizer(*models[0], str(workdir), write=True)
  assert (workdir / "tokenizer.model").read_bytes() == models[0][0].model_proto
  data.store_tokenizer(*models[1], str(workdir), write=True)  # no checkpoint yet: replaced
  assert (workdir / "tokenizer.model").read_bytes() == models[1][0].model_proto
  (workdir / "checkpoints" / "10").mkdir(parents=True)
  data.store_tokenizer(*models[1], str(workdir), write=True)  # the same model passes
  with pytest.raises(ValueError, match=r"is not the tokenizer of this workdir's checkpoints"):
    data.store_tokenizer(*models[0], str(workdir), write=True)
  with pytest.raises(ValueError, match=r"data.tokenizer='byte' \(byte, vocab 259\) is not"):
    data.store_tokenizer(data.make_tokenizer("byte"), "byte", str(workdir), write=True)
  assert (workdir / "tokenizer.model").read_bytes() == models[1][0].model_proto


def test_the_eval_loss_is_the_same_with_one_or_two_processes(tmp_path):
  write_corpus(tmp_path, 30)
  config = make_config(f"files:{tmp_path}/**/*.txt", eval_fraction=0.3)
  config.eval.steps = 6  # more than the split: the last batch is part padding, part whole rows
  one = data.make_eval_batches(config, 0, 1)
  two = [data.make_eval_batches(config, p, 2) for p in (0, 1)]
  # What make_array_from_process_local_data assembles from the two hosts' parts:
  assembled = [{k: np.concatenate([two[0][s][k], two[1][s][k]]) for k in one[0]}
               for s in range(len(one))]
  model = step_lib.make_model(config)
  tokens = np.zeros((1, config.seq_len), np.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, tokens + 1)["params"]
  rng = np.random.default_rng(0)  # any params will do, and drawing them costs no compile
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), nn.unbox(shapes))
  eval_step = jax.jit(step_lib.make_eval_step(model, config))

  def metric(batches):
    outs = [jax.device_get(eval_step(params, b)) for b in batches]
    return sum(float(o["loss_sum"]) for o in outs) / sum(float(o["count"]) for o in outs)
  assert np.isfinite(metric(one)) and metric(one) == metric(assembled)
  assert sum(int(b["loss_mask"].sum()) for b in one) == sum(
      int(b["loss_mask"].sum()) for host in two for b in host)
