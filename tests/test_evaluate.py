"""Evaluation: scores equal the model's log-likelihoods, tasks count right, clear errors, the CLI.

8 simulated CPU devices: the size=test model, params sharded over data=2 x fsdp=2 x tensor=2.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import lm
from foundation import config as config_lib
from foundation import data
from foundation import evaluate
from foundation import generate
from foundation import hf
from foundation import mesh as mesh_lib
from foundation import optim
from foundation import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharTokenizer:
  """Every id >= 3 is one character (ASCII like the byte tokenizer, the rest from U+0100 on), so
  any sequence of model ids survives decode -> encode: a random model's greedy text is a valid
  answer."""
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 384

  def encode(self, text):
    return [ord(c) + 3 if ord(c) < 256 else ord(c) - 0x100 + 259 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 3) if i < 259 else chr(0x100 + i - 259) for i in map(int, ids) if i > 2)


@pytest.fixture(scope="module")
def setup():
  """(config, runtime, params): size=test, synthetic data, params in training shardings."""
  config = lm.get_config("size=test")
  with config.unlocked():
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.data.source = "synthetic"
    config.eval.steps = 2
  mesh = mesh_lib.make_mesh(config.mesh)
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  _, shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  params = step_lib.init_state(model, optimizer, config, mesh, shardings)["params"]
  runtime = evaluate.Runtime(model, mesh, mesh_lib.rules(config), CharTokenizer())
  return config, runtime, params


def reference_logp(runtime, params, context, continuation, width=128):
  """log p(continuation | context) from one plain forward pass, summed in numpy float64."""
  ids = (context + continuation)[-(width + 1):]
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(ids) - 1] = ids[:-1]
  segments = (np.arange(width) < len(ids) - 1).astype(np.int32)[None]
  logits = forward(runtime.model, params, tokens, np.arange(width, dtype=np.int32)[None], segments)
  logp = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
  n = len(continuation)
  return sum(logp[len(ids) - 1 - n + k, ids[len(ids) - n + k]] for k in range(n))


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens, positions, segments):
  return model.apply({"params": params}, tokens, positions, segments)


def greedy_text(runtime, params, prompt_ids, n):
  ids = generate.generate(runtime.model, params, [prompt_ids], max_new_tokens=n,
                          max_len=runtime.max_len, stop_tokens=(2,), mesh=runtime.mesh,
                          axis_rules=runtime.axis_rules)[0]
  assert len(ids) == n and min(ids) > 2, ids  # a fixed seed: holds, or pick another
  return runtime.tokenizer.decode(ids)


def test_scores_are_the_model_log_likelihoods(setup):
  _, runtime, params = setup
  rng = np.random.default_rng(0)
  pairs = [([1] + list(rng.integers(3, 384, n)), list(rng.integers(3, 384, m)))
           for n, m in ((5, 3), (20, 1), (1, 6), (200, 4))]  # the last is cut to the context
  # The model's own greedy continuation of the first context, which `score` must recognise.
  greedy = generate.generate(runtime.model, params, [pairs[0][0]], max_new_tokens=4,
                             max_len=runtime.max_len, mesh=runtime.mesh,
                             axis_rules=runtime.axis_rules)[0]
  pairs.append((pairs[0][0], greedy))
  scores = evaluate.score(runtime, params, pairs)
  with jax.set_mesh(runtime.mesh):
    for (logp, _), (context, continuation) in zip(scores, pairs):
      np.testing.assert_allclose(logp, reference_logp(runtime, params, context, continuation),
                                 rtol=1e-5)
  assert [is_greedy for _, is_greedy in scores] == [False] * 4 + [True]


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  return str(path)


def test_multiple_choice_accuracy(setup, tmp_path):
  """The model's own greedy continuation beats random strings of the same length."""
  _, runtime, params = setup
  tok, rng = runtime.tokenizer, np.random.default_rng(1)
  records = []
  for i in range(4):
    context = tok.decode(rng.integers(259, 384, 6))
    right = greedy_text(runtime, params, [tok.bos_id] + tok.encode(context), 4)
    choices = [tok.decode(rng.integers(3, 384, 4)) for _ in range(2)]
    choices.insert(i % 3, right)
    # The last record's answer names a random choice: the model cannot get that one.
    answer = i % 3 if i < 3 else (i % 3 + 1) % 3
    records.append({"context" if i % 2 else "question": context, "choices": choices,
                    "answer": answer})
  task = evaluate.MultipleChoice(write_jsonl(tmp_path / "quiz.jsonl", records), runtime,
                                 delimiter="")
  assert dict(task.run(params)) == {"mc/quiz/accuracy": 0.75, "mc/quiz/accuracy_norm": 0.75,
                                    "mc/quiz/examples": 4.0}


def test_few_shot_prompts(setup, tmp_path):
  _, runtime, _ = setup
  runtime = evaluate.Runtime(runtime.model, runtime.mesh, runtime.axis_rules, data.ByteTokenizer())
  records = [{"question": f"Q{i}?", "choices": [f"A{i}", "B"], "answer": 0} for i in range(5)]
  task = evaluate.MultipleChoice(write_jsonl(tmp_path / "q.jsonl", records), runtime, shots=2)
  for i in range(5):
    context, choice = task.pairs[2 * i]
    text = runtime.tokenizer.decode(context)
    shots = [int(s[1]) for s in text.split("\n\n")[:-1]]
    assert len(shots) == 2 and i not in shots and text.endswith(f"\n\nQ{i}?")
    assert all(f"Q{j}? A{j}" in text for j in shots)  # each shot shows its right answer
    assert runtime.tokenizer.decode(choice) == f" A{i}"
  assert evaluate.few_shot_indices(5, 3, 2, 0) == evaluate.few_shot_indices(5, 3, 2, 0)


def test_generation_task(setup, tmp_path):
  _, runtime, params = setup
  tok, rng = runtime.tokenizer, np.random.default_rng(2)
  records = []
  for i in range(3):
    source = tok.decode(rng.integers(259, 384, 5))
    target = greedy_text(runtime, params, [tok.bos_id] + tok.encode(source), 4)
    records.append({"source": source, "target": target} if i else
                   {"prompt": source, "references": ["wrong", target]})
  records.append({"input": tok.decode(rng.integers(259, 384, 5)), "answer": "nope"})
  task = evaluate.Generation(write_jsonl(tmp_path / "tr.jsonl", records), runtime,
                             max_new_tokens=4, delimiter="", batch_size=4)
  assert dict(task.run(params)) == {"gen/tr/exact_match": 0.75, "gen/tr/examples": 4.0}


def test_bleu():
  assert evaluate.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == \
      pytest.approx(100)
  partial = evaluate.bleu(["the cat sat on a mat today"], [["the cat sat on the mat"]])
  assert 0 < partial < 100
  # Several references: the best one counts.
  assert evaluate.bleu(["a b c d e"], [["x y z w v", "a b c d e"]]) == pytest.approx(100)


def test_perplexity_on_the_eval_split(setup):
  config, runtime, params = setup
  (name_loss, loss), (name_ppl, ppl), (_, tokens) = evaluate.Perplexity(config, runtime).run(params)
  assert (name_loss, name_ppl) == ("perplexity/loss", "perplexity/perplexity")
  nll, count = 0.0, 0
  for batch in data.make_eval_batches(config, 0, 1):
    with jax.set_mesh(runtime.mesh):
      logits = forward(runtime.model, params, batch["inputs"], batch["positions"],
                       batch["segment_ids"])
    logp = jax.nn.log_softmax(logits)
    picked = np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    nll -= float((picked * batch["loss_mask"]).sum())
    count += int(batch["loss_mask"].sum())
  assert tokens == count
  np.testing.assert_allclose(loss, nll / count, rtol=1e-5)
  np.testing.assert_allclose(ppl, np.exp(nll / count), rtol=1e-5)


def test_bad_task_files_are_clear_errors(setup, tmp_path):
  config, runtime, _ = setup
  path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 0},
                                            {"question": "q", "choices": ["x", "y"], "answer": 2}])
  with pytest.raises(ValueError, match=r"a\.jsonl:2: 'answer' must be the index \(0\.\.1\)"):
    evaluate.multiple_choice_examples(path)
  path = write_jsonl(tmp_path / "b.jsonl", [{"text": "q", "choices": ["x", "y"], "answer": 0}])
  with pytest.raises(ValueError, match=r"b\.jsonl:1: the record has none of the fields "
                                       r"\['context', 'question'\] \(it has \['answer', "):
    evaluate.multiple_choice_examples(path)
  (tmp_path / "c.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": \n')
  with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
    evaluate.generation_examples(str(tmp_path / "c.jsonl"))
  eval_config = common.evaluate_config()
  eval_config.tasks = "perplexity,quiz.jsonl"
  with pytest.raises(ValueError, match="'quiz.jsonl' is not a task; use 'eval', 'perplexity', "):
    evaluate.make_evaluators(config, runtime.model, runtime.mesh, runtime.tokenizer, eval_config)


def test_command_line(tmp_path):
  workdir = str(tmp_path / "run")
  hf.import_checkpoint(os.path.join(ROOT, "tests", "fixtures", "hf", "llama_gqa"), workdir,
                       template="test", dtype="float32", params_only=True)
  quiz = write_jsonl(tmp_path / "quiz.jsonl", [
      {"context": f"{i} + 1 =", "choices": [f" {i + 1}", " x"], "answer": 0} for i in range(4)])
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [
      {"source": f"{i} =", "target": f"{i}"} for i in range(3)])
  out = tmp_path / "results.json"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = subprocess.run(
      [sys.executable, "-m", "foundation.evaluate", "--workdir", workdir, "--tasks",
       f"perplexity,mc:{quiz},gen:{pairs}", "--shots", "1", "--metric", "bleu",
       "--max_new_tokens", "4", "--override", "data.source=synthetic", "--eval_steps", "1",
       "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  assert set(results) == {"step", "perplexity/loss", "perplexity/perplexity", "perplexity/tokens",
                          "mc/quiz/accuracy", "mc/quiz/accuracy_norm", "mc/quiz/examples",
                          "gen/pairs/bleu", "gen/pairs/examples"}
  assert results["mc/quiz/examples"] == 4 and 0 <= results["mc/quiz/accuracy"] <= 1
  assert f"perplexity/perplexity: {results['perplexity/perplexity']:.6g}" in result.stdout


def test_the_trainer_runs_the_tasks_periodically(tmp_path):
  """evaluate.every=2: the tasks at steps 0, 2 and 4 in metrics.jsonl; the perplexity task reads
  the same eval batches as the trainer's own eval, so the two losses agree."""
  from foundation import train  # pylint: disable=g-import-not-at-top
  quiz = write_jsonl(tmp_path / "quiz.jsonl", [
      {"context": f"{i} + 1 =", "choices": [f" {i + 1}", " x", " 0"], "answer": 0}
      for i in range(3)])
  config = lm.get_config("size=test")
  with config.unlocked():
    config.update(steps=4)
    config.eval.update(every=2, steps=2)
    config.evaluate.update(every=2, tasks=f"perplexity,mc:{quiz}")
    config.checkpoint.every = 100
    config.log.update(every=2, generate_tokens=0)
  workdir = tmp_path / "run"
  train.train(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  tasks = {r["step"]: r for r in records if r["split"] == "tasks"}
  evals = {r["step"]: r for r in records if r["split"] == "eval"}
  assert sorted(tasks) == [0, 2, 4]
  for step, record in tasks.items():
    assert record["mc/quiz/examples"] == 3 and 0 <= record["mc/quiz/accuracy"] <= 1
    np.testing.assert_allclose(record["perplexity/loss"], evals[step]["loss"], rtol=1e-6)
  assert tasks[4]["perplexity/loss"] < tasks[0]["perplexity/loss"]  # it trained
  with config.unlocked():
    config.evaluate.tasks = "mc:missing.jsonl"
  with pytest.raises(config_lib.ConfigError, match="missing.jsonl"):  # one line, before training
    train.train(config, str(tmp_path / "other"))
