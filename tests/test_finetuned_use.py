"""Using fine-tuned runs: a classifier keeps its label names, is evaluated on its own eval split
(accuracy, confusion table) and labels texts by name (Python and CLI); an SFT run is evaluated on
its own SFT eval split. evaluate's figures are the trainer's eval figures at the same checkpoint.

The runs are real `python -m foundation.train` subprocesses of the size=test model, built once.
"""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from foundation import evaluate
from foundation import finetune
from foundation import generate
from foundation.data import classify
from foundation.data import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS_STEPS, SFT_STEPS = 40, 6
NEG, POS = ["bad", "awful", "dull"], ["good", "great", "fun"]
# 2 simulated devices for the command-line runs (start-up is quicker than with 8).
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def run_module(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def eval_record(workdir, step):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return next(r for r in records if r["split"] == "eval" and r["step"] == step)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  """(workdir, trainer stdout): a 2-class classifier of a labelled CSV ('pos' rows come first in
  the file; the ids follow the sorted names: neg=0, pos=1)."""
  folder = tmp_path_factory.mktemp("cls")
  rng = np.random.default_rng(0)
  with open(folder / "reviews.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for i in range(400):
      label = "pos" if i == 0 else rng.choice(["neg", "pos"])
      words = rng.choice(NEG if label == "neg" else POS, size=3)
      filler = rng.choice(["the", "film", "was", "plot", "and", "a"], size=5)
      writer.writerow([" ".join(rng.permutation(np.concatenate([words, filler]))), label])
  workdir = str(folder / "run")
  result = run_module(
      "foundation.train", "--config", "configs/finetune.py:task=classify,base=test",
      "--workdir", workdir, f"--config.steps={CLS_STEPS}", "--config.seq_len=64",
      "--config.optim.lr=3e-3", "--config.optim.warmup_steps=5",
      f"--config.classify.train_path={folder / 'reviews.csv'}", f"--config.eval.every={CLS_STEPS}",
      "--config.eval.steps=4", f"--config.checkpoint.every={CLS_STEPS}", "--config.log.every=20")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """An SFT run on short sums: {"prompt": "3+4", "response": "7"} a line."""
  folder = tmp_path_factory.mktemp("sft")
  chat = folder / "sums.jsonl"
  chat.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "response": f"{a + b}"}) + "\n"
                          for a in range(20) for b in range(10)))
  workdir = str(folder / "run")
  result = run_module(
      "foundation.train", "--config", "configs/finetune.py:task=sft,base=test",
      "--workdir", workdir, f"--config.steps={SFT_STEPS}", "--config.seq_len=64",
      f"--config.sft.train_path={chat}",
      "--config.optim.warmup_steps=2", f"--config.eval.every={SFT_STEPS}", "--config.eval.steps=2",
      f"--config.checkpoint.every={SFT_STEPS}", "--config.log.every=3")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def own_eval(session, workdir, tasks="eval"):
  eval_config = common.evaluate_config()
  eval_config.tasks = tasks
  evaluators = evaluate.make_evaluators(session.config, session.model, session.mesh,
                                        session.tokenizer, eval_config, workdir)
  return evaluators, evaluate.run(evaluators, session.params)


def test_a_classify_run_keeps_and_prints_its_label_names(classifier, tmp_path):
  workdir, stdout = classifier
  assert "labels: 0=neg, 1=pos (kept in " in stdout
  with open(os.path.join(workdir, "labels.json")) as f:
    assert json.load(f) == {"labels": ["neg", "pos"]}
  # Once checkpoints exist, other names are refused (one line) and the file is kept.
  with pytest.raises(ValueError, match=r"labels.json holds the labels \['neg', 'pos'\] of this "
                                       r"workdir's checkpoints, but this run's data gives"):
    classify.store_labels(["bad", "good"], workdir, True)
  assert classify.read_labels(workdir) == ["neg", "pos"]
  classify.store_labels(["a", "b"], str(tmp_path), True)  # no checkpoints yet: simply replaced
  classify.store_labels(["b", "c"], str(tmp_path), True)
  assert classify.read_labels(str(tmp_path)) == ["b", "c"]


def test_evaluating_a_classifier_gives_the_trainers_accuracy_and_a_confusion_table(classifier):
  workdir, _ = classifier
  session = generate.load(workdir)
  evaluators, results = own_eval(session, workdir)
  trainer = eval_record(workdir, CLS_STEPS)
  np.testing.assert_allclose(results["classify/accuracy"], trainer["accuracy"], rtol=1e-6)
  np.testing.assert_allclose(results["classify/loss"], trainer["loss"], rtol=1e-6)
  assert results["classify/accuracy"] >= 0.9, results
  # The table counts the eval rows by true and predicted label; its diagonal is the accuracy.
  data = classify.ClassifyData(session.config)
  labels = data.eval[1][:session.config.eval.steps * session.config.batch_size]
  confusion = evaluators[0].confusion
  assert confusion.sum() == results["classify/examples"] == len(labels)
  assert list(confusion.sum(axis=1)) == [np.sum(labels == 0), np.sum(labels == 1)]
  assert results["classify/count/neg"] == np.sum(labels == 0)
  assert np.trace(confusion) / len(labels) == pytest.approx(results["classify/accuracy"])
  assert results["classify/confusion/pos/neg"] == confusion[1, 0]
  assert evaluators[0].table().splitlines()[1:] == [
      f"{'':>6}  {'neg':>6}  {'pos':>6}",
      f"{'neg':>6}  {confusion[0, 0]:>6}  {confusion[0, 1]:>6}",
      f"{'pos':>6}  {confusion[1, 0]:>6}  {confusion[1, 1]:>6}"]


def test_a_classifier_labels_texts_by_name(classifier):
  workdir, _ = classifier
  session = generate.load(workdir)
  assert session.labels == ["neg", "pos"]
  texts = ["the film was good and great fun", "a dull plot and awful bad film", "fun"]
  results = session.classify(texts)
  assert [label for label, _ in results[:2]] == ["pos", "neg"]
  for label, probs in results:
    assert list(probs) == sorted(probs, key=probs.get, reverse=True) and list(probs)[0] == label
    assert set(probs) == {"neg", "pos"} and sum(probs.values()) == pytest.approx(1.0)
  # The probabilities are the softmax of the head at each text's eos in a full training row.
  tokens = [classify.encode(session.tokenizer, t, session.config.seq_len, "right") for t in texts]
  batch = classify.build_batch(tokens, np.zeros(3, np.int32), [(0,), (1,), (2,)],
                               session.config.seq_len)
  logits = np.asarray(finetune.classify_logits(session.model, session.params, batch), np.float64)
  expected = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
  for (_, probs), row in zip(results, expected):
    np.testing.assert_allclose([probs["neg"], probs["pos"]], row, rtol=1e-5)
  with pytest.raises(ValueError, match=r"is a classifier \(model.num_classes=2\): it predicts "
                                       r"labels, not text; use session.classify"):
    session.generate(["the film"])


def test_language_model_tasks_on_a_classifier_are_one_line_errors(classifier, tmp_path):
  workdir, _ = classifier
  session = generate.load(workdir)
  quiz = tmp_path / "quiz.jsonl"
  quiz.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n")
  for task in (f"mc:{quiz}", "perplexity", "sft"):
    with pytest.raises(ValueError, match=rf"evaluate.tasks: '{task}' scores a language model's "
                                         r"next tokens, but this run is a classifier"):
      own_eval(session, workdir, task)


def test_the_command_lines_on_a_classifier(classifier, tmp_path):
  workdir, _ = classifier
  out = tmp_path / "results.json"
  result = run_module("foundation.evaluate", "--workdir", workdir, "--output", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  np.testing.assert_allclose(results["classify/accuracy"],
                             eval_record(workdir, CLS_STEPS)["accuracy"], rtol=1e-6)
  assert "confusion (rows: true label, columns: predicted label)" in result.stdout
  assert f"classify/accuracy: {results['classify/accuracy']:.6g}" in result.stdout
  result = run_module("foundation.generate", "--workdir", workdir,
                      "--prompt", "the film was good and great fun")
  assert result.returncode == 0, result.stderr[-3000:]
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith("pos (p=") and "top 2: pos " in line and ", neg " in line, line


def test_evaluating_an_sft_run_uses_its_own_eval_split(sft_run, tmp_path):
  """The default task of an SFT run is its SFT eval split (the answer tokens), giving the
  trainer's eval loss; `perplexity` still measures the pre-training corpus."""
  out = tmp_path / "results.json"
  result = run_module("foundation.evaluate", "--workdir", sft_run, "--output", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  trainer = eval_record(sft_run, SFT_STEPS)
  assert set(results) == {"step", "sft/loss", "sft/perplexity", "sft/tokens"}
  np.testing.assert_allclose(results["sft/loss"], trainer["loss"], rtol=1e-6)
  np.testing.assert_allclose(results["sft/perplexity"], trainer["perplexity"], rtol=1e-6)
  session = generate.load(sft_run)
  # The tokens counted are the answer tokens of the eval split's rows.
  batches = sft.make_sft_eval_batches(session.config, 0, 1)
  assert results["sft/tokens"] == sum(int(b["loss_mask"].sum()) for b in batches)
  _, corpus = own_eval(session, sft_run, "perplexity")
  assert abs(corpus["perplexity/loss"] - results["sft/loss"]) > 0.01, (corpus, results)
  with pytest.raises(ValueError, match=r"evaluate.tasks: 'classify' needs a task='classify' run's"
                                       r" eval split, but this run's task is 'sft'"):
    own_eval(session, sft_run, "classify")
  assert jax.device_count() == 8  # the in-process checks ran on the 8 simulated devices
