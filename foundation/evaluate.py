r"""Evaluation: perplexity on a split, multiple-choice log-likelihood, generation tasks.

  python -m foundation.evaluate --workdir runs/tiny                        # its own eval split
  python -m foundation.evaluate --workdir runs/tiny --tasks mc:data/quiz.jsonl --shots 3
  python -m foundation.evaluate --workdir runs/tiny --tasks gen:data/de-en.jsonl --metric bleu
  python -m foundation.evaluate --workdir runs/tiny --tasks perplexity,mc:a.jsonl,gen:b.jsonl
  python -m foundation.evaluate --workdir runs/cls                         # accuracy, confusion

Tasks (`--tasks`, or `config.evaluate.tasks`; comma-separated):
  eval         (the command line's default) the run's own task on its own eval split, with the
               trainer's eval step and sums, so the figures are the trainer's eval/* at that
               step: `perplexity` for a language model, `sft` for an SFT run, `classify` for a
               classifier.
  perplexity   the data pipeline's eval batches (config.data's eval split, config.eval.steps
               batches): token loss and perplexity. On an SFT run: the pre-training corpus.
  sft          an SFT run's eval split (sft.eval_path, or the held-out sft.eval_fraction): loss
               and perplexity over the answer tokens (the tokens the run trains on).
  classify     a classifier's eval split (classify.*): loss, accuracy, per-label counts and
               accuracy, and the confusion table (true label x predicted label, by name).
  mc:FILE      multiple choice, JSONL {"context" (or "question"), "choices": [...], "answer": i}.
               Each choice is scored by the log-likelihood of its tokens after the context
               (context + delimiter + choice); accuracy (highest sum) and accuracy_norm (highest
               sum per character of the choice) are reported.
  gen:FILE     generation, JSONL {"source" (or "prompt", "input", "context", "question"),
               "target" (or "reference", "answer", "references": [...])}. Greedy continuation of
               source + delimiter, cut at the first newline; exact_match (whitespace-normalised,
               any reference) or BLEU (sacrebleu, corpus level).
  suite:NAME:FILE
               a standard benchmark (foundation/suites.py: hellaswag, arc_easy, arc_challenge,
               piqa, winogrande, mmlu, lambada, gsm8k) from its publisher's file (JSONL, parquet,
               MMLU's CSV), with lm-evaluation-harness's prompts and scoring (zero-shot):
               `NAME/acc`, `NAME/acc_norm`, `lambada/perplexity`, `gsm8k/exact_match,FILTER`.
               `--suites configs/suites.py` runs a list of them and prints a markdown table per
               checkpoint (`--steps all` for every checkpoint; `--markdown FILE` keeps it).
`shots` > 0 puts that many solved examples of the same file (never the one asked), separated by
blank lines, before each question. Contexts too long for the model lose their oldest tokens.
A classifier has no vocabulary output: only `eval`/`classify` apply to it (its labels for a text:
`python -m foundation.generate --workdir CLS --prompt TEXT`, or `Session.classify`).

During training (the trainer's periodic evaluator; one object per task, built once):
  evaluators = evaluate.make_evaluators(config, model, mesh, tokenizer)  # from config.evaluate
  metrics = evaluate.run(evaluators, state["params"])                    # {'mc/quiz/accuracy': ..}
"""

import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from foundation import generate as generate_lib
from foundation import mesh as mesh_lib
from foundation import suites as suites_lib

CONTEXT_FIELDS = ("context", "question")
SOURCE_FIELDS = ("source", "prompt", "input", "context", "question")
TARGET_FIELDS = ("target", "reference", "answer", "references")


@dataclasses.dataclass
class Runtime:
  """What every evaluator needs besides the params: the model, its mesh and rules, a tokenizer."""
  model: object
  mesh: object
  axis_rules: tuple
  tokenizer: object

  @property
  def max_len(self) -> int:
    return self.model.cfg.max_seq_len


# ------------------------------------------------------------------ reading task files

def read_jsonl(path: str, limit: int = 0) -> list[dict]:
  """The records of a JSONL file (blank lines skipped); at most `limit` (0: all)."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
      records[-1]["_line"] = number
      if limit and len(records) == limit:
        break
  if not records:
    raise ValueError(f"{path}: no records")
  return records


def _field(record: dict, names: Sequence[str], path: str):
  for name in names:
    if name in record:
      return record[name]
  raise ValueError(f"{path}:{record['_line']}: the record has none of the fields {list(names)} "
                   f"(it has {sorted(k for k in record if k != '_line')})")


def multiple_choice_examples(path: str, limit: int = 0) -> list[tuple[str, list[str], int]]:
  """[(context, choices, answer index)] from a multiple-choice JSONL file; bad records raise."""
  examples = []
  for record in read_jsonl(path, limit):
    context = _field(record, CONTEXT_FIELDS, path)
    choices, answer = _field(record, ("choices",), path), _field(record, ("answer",), path)
    where = f"{path}:{record['_line']}"
    if not isinstance(choices, list) or len(choices) < 2 or not all(
        isinstance(c, str) for c in choices):
      raise ValueError(f"{where}: 'choices' must be a list of at least two strings")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
      raise ValueError(f"{where}: 'answer' must be the index (0..{len(choices) - 1}) of the "
                       f"right choice, got {answer!r}")
    examples.append((str(context), choices, answer))
  return examples


def generation_examples(path: str, limit: int = 0) -> list[tuple[str, list[str]]]:
  """[(source, references)] from a generation JSONL file."""
  examples = []
  for record in read_jsonl(path, limit):
    target = _field(record, TARGET_FIELDS, path)
    references = target if isinstance(target, list) else [target]
    examples.append((str(_field(record, SOURCE_FIELDS, path)), [str(r) for r in references]))
  return examples


def few_shot_indices(n: int, i: int, shots: int, seed: int) -> list[int]:
  """`shots` example indices other than i, the same on every call and host."""
  others = [j for j in range(n) if j != i]
  rng = np.random.default_rng([seed, i])
  return [others[j] for j in rng.permutation(len(others))[:shots]]


# ------------------------------------------------------------------ scoring continuations

@functools.partial(jax.jit, static_argnames=("model",))
def _score_batch(model, params, inputs, targets, mask, segments):
  """Sum of target log-probs over `mask`, and whether every masked target is the argmax: [B]."""
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  logits = model.apply({"params": params}, inputs, positions, segments)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
  return jnp.sum(target_logp * mask, axis=1), jnp.all(greedy, axis=1)


def score(runtime: Runtime, params, pairs: Sequence[tuple[list[int], list[int]]],
          batch_size: int = 8) -> list[tuple[float, bool]]:
  """(log p(continuation | context), continuation is the greedy one) for each pair of token ids.

  Context + continuation is cut from the left to the model's context; rows are right-padded to a
  power-of-two width and batches laid out on the mesh like training batches.
  """
  max_len = runtime.max_len
  dp = mesh_lib.data_parallel_degree(runtime.mesh, runtime.axis_rules)
  batch_size = -(-batch_size // dp) * dp
  results = []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    rows = []
    for context, continuation in chunk:
      if len(continuation) >= max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                         f"context of {max_len} tokens")
      rows.append(((context + continuation)[-(max_len + 1):], len(continuation)))
    width = min(max_len, generate_lib.bucket(max(len(ids) - 1 for ids, _ in rows)))
    arrays = np.zeros((4, batch_size, width), np.int32)  # inputs, targets, mask, segments
    for b, (ids, n) in enumerate(rows):
      length = len(ids) - 1
      arrays[0, b, :length], arrays[1, b, :length] = ids[:-1], ids[1:]
      arrays[2, b, length - n:length] = 1
      arrays[3, b, :length] = 1
    with jax.set_mesh(runtime.mesh), nn.logical_axis_rules(runtime.axis_rules):
      placed = [generate_lib.place_batch(a, runtime.mesh, runtime.axis_rules) for a in arrays]
      logp, greedy = _score_batch(runtime.model, params, *placed)
    logp, greedy = generate_lib.to_host(logp), generate_lib.to_host(greedy)
    results += [(float(logp[b]), bool(greedy[b])) for b in range(len(chunk))]
  return results


# ------------------------------------------------------------------ a run's own eval split

def eval_sums(eval_step, params, eval_batches, batch_shardings) -> dict[str, float]:
  """The eval step's sums (the task's: 'loss_sum', 'count' (tokens or rows), a classifier's
  'correct') over this host's share of the eval batches, added in float64 on the host (exact over
  hosts). The task's `eval_metrics` turns them into the eval/* figures."""
  sums = {}
  for local_batch in eval_batches:
    out = jax.device_get(eval_step(params, mesh_lib.make_global_batch(local_batch,
                                                                       batch_shardings)))
    sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
  return sums


def own_task(config) -> str:
  """The task `eval` stands for on this run: 'perplexity', 'sft' or 'classify' for the text
  tasks; any other task's own name (its input's eval split, its own metrics: `OwnSplit`)."""
  task = config.get("task", "lm")
  return {"lm": "perplexity", "sft": "sft", "classify": "classify"}.get(task, task)


class EvalSplit:
  """A task on eval batches with the trainer's eval step and sums: the figures of the trainer's
  eval/* (the task's `eval_metrics`), and how many tokens or examples they cover. Named '' and
  counting nothing (`count_name` ''), its keys are the task's own ('loss', 'perplexity'): the
  trainer's held-out evaluator (`trainer_schedule`)."""

  def __init__(self, name: str, config, runtime: "Runtime", batches, count_name: str):
    from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
    self.name, self.runtime, self.batches, self.count_name = name, runtime, batches, count_name
    self.task = step_lib.make_task(config)
    self.sharding = step_lib.batch_shardings(config, runtime.mesh, self.task)
    self.step = jax.jit(step_lib.make_eval_step(runtime.model, config, self.task))

  def run(self, params) -> Iterator[tuple[str, float]]:
    with jax.set_mesh(self.runtime.mesh), nn.logical_axis_rules(self.runtime.axis_rules):
      sums = eval_sums(self.step, params, self.batches, self.sharding)
    prefix = f"{self.name}/" if self.name else ""
    for key, value in self.task.eval_metrics(sums).items():
      yield f"{prefix}{key}", value
    if self.count_name:
      yield f"{prefix}{self.count_name}", sums.get("count", 0.0)


class OwnSplit(EvalSplit):
  """Any task on its own input's eval split (an image classifier: loss and top-1 accuracy)."""

  def __init__(self, config, runtime: "Runtime"):
    from foundation import registry  # pylint: disable=g-import-not-at-top
    from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
    make_input = registry.get("input", step_lib.make_task(config).input,
                              field=f"task {config.task!r}'s input")
    _, batches = make_input(config, jax.process_index(), jax.process_count(), True)
    super().__init__(config.task, config, runtime, batches, "examples")


class HeldOut(EvalSplit):
  """Token loss and perplexity over eval batches.

  `perplexity`: the data pipeline's eval batches (config.data, config.eval); `sft`: an SFT run's
  eval split (foundation/data/sft.py), loss over the answer tokens only.
  """

  def __init__(self, name: str, config, runtime: "Runtime"):
    from foundation import data  # pylint: disable=g-import-not-at-top
    index, count = jax.process_index(), jax.process_count()
    if name == "sft":
      from foundation.data import sft  # pylint: disable=g-import-not-at-top
      batches = sft.make_sft_eval_batches(config, index, count)
    else:
      batches = data.make_eval_batches(config, index, count)
    super().__init__(name, config, runtime, batches, "tokens")


class Perplexity(HeldOut):
  """Token loss and perplexity over the data pipeline's eval batches (config.data, config.eval)."""

  def __init__(self, config, runtime: Runtime):
    super().__init__("perplexity", config, runtime)


class Classification:
  """A classifier on its eval split (classify.*, config.eval.steps batches): the trainer's loss
  and accuracy, per-label counts and accuracy, and the confusion table, labels by name."""
  name = "classify"

  def __init__(self, config, runtime: Runtime, workdir: str | None = None):
    from foundation import finetune  # pylint: disable=g-import-not-at-top
    from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
    from foundation.data import classify  # pylint: disable=g-import-not-at-top
    data = classify.ClassifyData(config)
    stored = classify.read_labels(workdir) if workdir else None
    if stored is not None and stored != data.names:
      raise ValueError(f"{os.path.join(workdir, classify.LABELS_FILE)} holds the labels "
                       f"{stored[:20]} the run trained with, but its eval data now gives "
                       f"{data.names[:20]}: the classify.* files changed since")
    self.names, self.runtime = data.names, runtime
    self.batches = classify.make_classify_eval_batches(
        config, jax.process_index(), jax.process_count(), data)
    self.task = step_lib.make_task(config)
    self.sharding = step_lib.batch_shardings(config, runtime.mesh, self.task)
    self.step = jax.jit(step_lib.make_eval_step(runtime.model, config, self.task))
    self.logits = jax.jit(functools.partial(finetune.classify_logits, runtime.model))
    self.confusion = np.zeros((len(self.names), len(self.names)), np.int64)

  def confusion_table(self, params) -> np.ndarray:
    """int64 [true label, predicted label] counts over the eval rows."""
    confusion = np.zeros_like(self.confusion)
    for local_batch in self.batches:
      batch = mesh_lib.make_global_batch(local_batch, self.sharding)
      predicted = np.argmax(generate_lib.to_host(self.logits(params, batch)), axis=-1)
      labels, mask = (generate_lib.to_host(batch[k]) for k in ("labels", "label_mask"))
      np.add.at(confusion, (labels[mask > 0], predicted[mask > 0]), 1)
    return confusion

  def run(self, params) -> Iterator[tuple[str, float]]:
    with jax.set_mesh(self.runtime.mesh), nn.logical_axis_rules(self.runtime.axis_rules):
      sums = eval_sums(self.step, params, self.batches, self.sharding)
      self.confusion = self.confusion_table(params)
    for key, value in self.task.eval_metrics(sums).items():
      yield f"{self.name}/{key}", value
    yield f"{self.name}/examples", sums.get("count", 0.0)
    for i, name in enumerate(self.names):
      count = int(self.confusion[i].sum())
      yield f"{self.name}/count/{name}", float(count)
      yield f"{self.name}/accuracy/{name}", float(self.confusion[i, i] / max(count, 1))
    for i, true in enumerate(self.names):
      for j, predicted in enumerate(self.names):
        yield f"{self.name}/confusion/{true}/{predicted}", float(self.confusion[i, j])

  def table(self) -> str:
    """The last run's confusion table as text: a row per true label, a column per prediction."""
    names = [str(n) for n in self.names]
    width = max(6, *(len(n) for n in names), len(str(int(self.confusion.max(initial=0)))))
    lines = ["confusion (rows: true label, columns: predicted label)",
             " " * width + "".join(f"  {n:>{width}}" for n in names)]
    for name, row in zip(names, self.confusion):
      lines.append(f"{name:>{width}}" + "".join(f"  {int(c):>{width}}" for c in row))
    return "\n".join(lines)


class MultipleChoice:
  """Log-likelihood multiple choice from a JSONL file: accuracy and length-normalised accuracy."""

  def __init__(self, path: str, runtime: Runtime, shots: int = 0, limit: int = 0,
               delimiter: str = " ", batch_size: int = 8, seed: int = 0):
    self.name = "mc/" + os.path.splitext(os.path.basename(path))[0]
    self.examples = multiple_choice_examples(path, limit)
    self.runtime, self.delimiter, self.batch_size = runtime, delimiter, batch_size
    tok = runtime.tokenizer
    self.pairs, self.owners = [], []  # one (context ids, choice ids) per choice
    for i, (context, choices, _) in enumerate(self.examples):
      shots_text = "".join(
          f"{self.examples[j][0]}{delimiter}{self.examples[j][1][self.examples[j][2]]}\n\n"
          for j in few_shot_indices(len(self.examples), i, shots, seed))
      context_ids = [tok.bos_id] + tok.encode(shots_text + context)
      for choice in choices:
        self.pairs.append((context_ids, tok.encode(delimiter + choice)))
        self.owners.append(i)

  def run(self, params) -> Iterator[tuple[str, float]]:
    scores = score(self.runtime, params, self.pairs, self.batch_size)
    right = right_norm = 0
    k = 0
    for context, choices, answer in self.examples:
      logps = np.array([s for s, _ in scores[k:k + len(choices)]])
      chars = np.array([max(1, len(self.delimiter + c)) for c in choices])
      right += int(np.argmax(logps) == answer)
      right_norm += int(np.argmax(logps / chars) == answer)
      k += len(choices)
    n = len(self.examples)
    yield f"{self.name}/accuracy", right / n
    yield f"{self.name}/accuracy_norm", right_norm / n
    yield f"{self.name}/examples", float(n)


def normalise(text: str) -> str:
  return re.sub(r"\s+", " ", text).strip()


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus BLEU (sacrebleu, its default 13a tokenisation), 0..100."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  n_refs = max(len(r) for r in references)
  # sacrebleu wants one list per reference position; a missing reference repeats the first.
  streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(n_refs)]
  return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


class Generation:
  """Greedy generation from a JSONL file, scored by exact match or BLEU."""

  def __init__(self, path: str, runtime: Runtime, metric: str = "exact_match", shots: int = 0,
               limit: int = 0, delimiter: str = " ", max_new_tokens: int = 32,
               batch_size: int = 8, seed: int = 0):
    if metric not in ("exact_match", "bleu"):
      raise ValueError(f"metric={metric!r}: use 'exact_match' or 'bleu'")
    self.name = "gen/" + os.path.splitext(os.path.basename(path))[0]
    self.examples = generation_examples(path, limit)
    self.runtime, self.metric, self.batch_size = runtime, metric, batch_size
    self.max_new_tokens = min(max_new_tokens, runtime.max_len - 2)
    tok, room = runtime.tokenizer, runtime.max_len - self.max_new_tokens
    self.prompts = []
    for i, (source, _) in enumerate(self.examples):
      shots_text = "".join(
          f"{self.examples[j][0]}{delimiter}{self.examples[j][1][0]}\n\n"
          for j in few_shot_indices(len(self.examples), i, shots, seed))
      ids = tok.encode(shots_text + source + delimiter)
      self.prompts.append([tok.bos_id] + ids[-(room - 1):])  # the oldest tokens go first

  def predictions(self, params) -> list[str]:
    out = []
    tok = self.runtime.tokenizer
    for start in range(0, len(self.prompts), self.batch_size):
      ids = generate_lib.generate(
          self.runtime.model, params, self.prompts[start:start + self.batch_size],
          max_new_tokens=self.max_new_tokens, max_len=self.runtime.max_len,
          stop_tokens=(tok.eos_id,), pad_id=tok.pad_id, mesh=self.runtime.mesh,
          axis_rules=self.runtime.axis_rules)
      out += [tok.decode(row).split("\n")[0].strip() for row in ids]
    return out

  def run(self, params) -> Iterator[tuple[str, float]]:
    hypotheses = self.predictions(params)
    references = [refs for _, refs in self.examples]
    if self.metric == "bleu":
      yield f"{self.name}/bleu", bleu(hypotheses, references)
    else:
      hits = [any(normalise(h) == normalise(r) for r in refs)
              for h, refs in zip(hypotheses, references)]
      yield f"{self.name}/exact_match", float(np.mean(hits))
    yield f"{self.name}/examples", float(len(hypotheses))


class BenchmarkSuite:
  """A standard suite from its publisher's file, scored as lm-evaluation-harness does
  (foundation/suites.py): per-example log-likelihoods (or gsm8k's greedy answers) into the
  harness's metrics. `samples` holds the last run's per-example scores."""

  def __init__(self, suite: str, path: str, runtime: Runtime, limit: int = 0, batch_size: int = 8,
               max_gen_toks: int = suites_lib.MAX_GEN_TOKS, num_fewshot: int = 0):
    if num_fewshot:
      raise ValueError(f"suite {suite!r}: num_fewshot={num_fewshot}; only the harness's zero-shot "
                       f"prompts are implemented (num_fewshot=0)")
    self.suite, self.path, self.runtime, self.batch_size = suite, path, runtime, batch_size
    self.name = suite
    self.docs = suites_lib.read_docs(suite, path, limit)
    self.encoder = suites_lib.HarnessEncoder(runtime.tokenizer)
    # Token ids once: the pairs of every request, or the prompts of a generation suite.
    self.pairs = [self.encoder.encode_pair(c, x) for d in self.docs for c, x in d.requests]
    self.prompts = [self.encoder.encode(d.prompt) for d in self.docs if d.prompt]
    self.max_gen_toks = max_gen_toks
    if self.prompts and max_gen_toks >= runtime.max_len:
      raise ValueError(f"suite {suite!r}: max_gen_toks={max_gen_toks} leaves no room for a "
                       f"prompt in the model's context of {runtime.max_len} tokens")
    self.samples: list[dict] = []

  def generate(self, params) -> list[str]:
    """Greedy answers as the harness's HFLM.generate_until makes them: the prompt cut from the
    left to max_len - max_gen_toks, at most max_gen_toks new tokens, EOS ends a row, and the text
    cut before the first stop sequence ("Question:", "</s>", "<|im_end|>", the EOS token's text)."""
    tok, runtime = self.runtime.tokenizer, self.runtime
    room = runtime.max_len - self.max_gen_toks
    stops = list(suites_lib.GSM8K_UNTIL) + [self.encoder.eos_text()]
    out = []
    for start in range(0, len(self.prompts), self.batch_size):
      rows = generate_lib.generate(
          runtime.model, params, [p[-room:] for p in self.prompts[start:start + self.batch_size]],
          max_new_tokens=self.max_gen_toks, max_len=runtime.max_len, stop_tokens=(tok.eos_id,),
          pad_id=tok.pad_id, mesh=runtime.mesh, axis_rules=runtime.axis_rules)
      out += [suites_lib.cut_at_stops(tok.decode(row), stops) for row in rows]
    return out

  def run(self, params) -> Iterator[tuple[str, float]]:
    if self.prompts:
      self.samples = suites_lib.score_docs(self.suite, self.docs, responses=self.generate(params))
    else:
      results = score(self.runtime, params, self.pairs, self.batch_size)
      self.samples = suites_lib.score_docs(self.suite, self.docs, results=results)
    for metric, value in suites_lib.aggregate(self.suite, self.samples).items():
      yield f"{self.name}/{metric}", value
    yield f"{self.name}/examples", float(len(self.docs))


def check_task(task: str, config) -> None:
  """A task the run cannot do (an LM task on a classifier, `sft` on another run) is a one-line
  error saying why."""
  run_task, kind = config.get("task", "lm"), task.partition(":")[0]
  if run_task == "classify" and kind != "classify":
    raise ValueError(
        f"evaluate.tasks: {task!r} scores a language model's next tokens, but this run is a "
        f"classifier (task='classify', model.num_classes={config.model.num_classes}) with no "
        f"vocabulary output; use the task 'eval' (accuracy on its eval split), and "
        f"`python -m foundation.generate --workdir WORKDIR --prompt TEXT` for a text's label")
  if kind in ("sft", "classify") and run_task != kind:
    raise ValueError(f"evaluate.tasks: {task!r} needs a task={kind!r} run's eval split, but this "
                     f"run's task is {run_task!r}; 'eval' evaluates any run on its own task")


def make_evaluators(config, model, mesh, tokenizer, eval_config=None,
                    workdir: str | None = None) -> list:
  """One evaluator per task of `eval_config` (default: config.evaluate, else its defaults).
  `workdir`: the run's, whose labels.json a classifier's evaluator checks its labels against."""
  from foundation import defaults as common  # pylint: disable=g-import-not-at-top
  from foundation import registry  # pylint: disable=g-import-not-at-top
  if eval_config is None:
    eval_config = config.get("evaluate") or common.evaluate_config()
  runtime = Runtime(model, mesh, mesh_lib.rules(config), tokenizer)
  shared = dict(shots=eval_config.shots, limit=eval_config.limit,
                delimiter=eval_config.delimiter, batch_size=eval_config.batch_size,
                seed=eval_config.seed)
  evaluators = []
  for task in [t.strip() for t in eval_config.tasks.split(",") if t.strip()]:
    task = own_task(config) if task == "eval" else task
    kind, _, path = task.partition(":")
    if kind in ("perplexity", "sft", "classify", "mc", "gen", "suite"):
      check_task(task, config)
    if kind in ("perplexity", "sft") and not path:
      evaluators.append(HeldOut(kind, config, runtime))
    elif kind == "classify" and not path:
      evaluators.append(Classification(config, runtime, workdir))
    elif kind == config.get("task") and not path:  # another family's task on its own split
      evaluators.append(OwnSplit(config, runtime))
    elif kind == "mc" and path:
      evaluators.append(MultipleChoice(path, runtime, **shared))
    elif kind == "gen" and path:
      evaluators.append(Generation(path, runtime, eval_config.metric,
                                   max_new_tokens=eval_config.max_new_tokens, **shared))
    elif kind == "suite" and ":" in path:
      suite, _, suite_path = path.partition(":")
      evaluators.append(BenchmarkSuite(suite, suite_path, runtime, limit=eval_config.limit,
                                       batch_size=eval_config.batch_size))
    elif kind in registry.names("evaluator"):  # a family's own (two_tower: zeroshot, retrieval)
      # It reads its settings (evaluate.limit, ...) from the config: the ones asked for here.
      evaluators.append(registry.get("evaluator", kind)(
          _with_evaluate(config, eval_config), runtime, path))
    else:
      raise ValueError(f"evaluate.tasks: {task!r} is not a task; use 'eval', 'perplexity', 'sft', "
                       f"'classify', 'mc:FILE.jsonl', 'gen:FILE.jsonl', 'suite:NAME:FILE' "
                       f"(NAME one of {', '.join(suites_lib.SUITES)}) or "
                       f"{', '.join(map(repr, registry.names('evaluator')))}")
  return evaluators


def _with_evaluate(config, eval_config):
  """`config` with its `evaluate` group replaced by `eval_config` (a copy when they differ)."""
  if config.get("evaluate") is eval_config:
    return config
  import ml_collections  # pylint: disable=g-import-not-at-top
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.evaluate = ml_collections.ConfigDict(eval_config.to_dict())
  return copy


def run(evaluators, params) -> dict[str, float]:
  """{name: value} of every evaluator on the model's `params` (a LoRA run's merged:
  lora.model_params)."""
  return {name: value for evaluator in evaluators for name, value in evaluator.run(params)}


@dataclasses.dataclass
class Every:
  """Evaluators the trainer runs every `every` steps (so at step 0 too: the baseline) and at the
  last step, their figures written under `prefix` ('eval/loss', 'tasks/mc/quiz/accuracy')."""
  prefix: str
  every: int
  evaluators: list

  def due(self, step: int, is_last: bool) -> bool:
    return bool(self.evaluators) and self.every > 0 and (step % self.every == 0 or is_last)


def trainer_schedule(config, model, mesh, tokenizer, eval_batches) -> list[Every]:
  """The trainer's evaluations, one system: its held-out figures on the input's eval batches
  (eval.*: the task's loss and metrics, under 'eval/') and the task evaluators of
  config.evaluate (under 'tasks/')."""
  runtime = Runtime(model, mesh, mesh_lib.rules(config), tokenizer)
  held_out = [EvalSplit("", config, runtime, eval_batches, "")] if eval_batches else []
  schedule = [Every("eval", config.eval.every, held_out)]
  if config.get("evaluate") and config.evaluate.every > 0:
    schedule.append(Every("tasks", config.evaluate.every,
                          make_evaluators(config, model, mesh, tokenizer)))
  return schedule


# ------------------------------------------------------------------ command line

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A run's workdir: config.json and checkpoints/.")
  flags.DEFINE_string("tasks", "eval", "Comma-separated: eval (the run's own task on its eval "
                      "split), perplexity, sft, classify, mc:FILE, gen:FILE.")
  flags.DEFINE_integer("shots", 0, "Solved examples before each question.")
  flags.DEFINE_string("metric", "exact_match", "Generation tasks: exact_match or bleu.")
  flags.DEFINE_integer("max_new_tokens", 32, "Generation tasks: longest answer, in tokens.")
  flags.DEFINE_integer("limit", 0, "At most this many examples per task (0: all).")
  flags.DEFINE_integer("batch_size", 8, "Rows per batch (rounded up to the data-parallel degree).")
  flags.DEFINE_string("delimiter", " ", "Between a context and its answer.")
  flags.DEFINE_integer("eval_steps", None, "eval, perplexity, sft, classify: eval batches "
                       "(default config.eval.steps).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("override", [], "A config field of the workdir, e.g. mesh.tensor=2.")
  flags.DEFINE_string("output", None, "Also write the results to this JSON file (several "
                      "checkpoints: a list, one object each).")
  flags.DEFINE_string("suites", None, "A suite config (configs/suites.py[:args]): the standard "
                      "benchmarks it names, from their files, scored as lm-evaluation-harness "
                      "does.")
  flags.DEFINE_string("steps", None, "Checkpoints to evaluate: 'all' or steps '100,200' "
                      "(default: --step, or the latest).")
  flags.DEFINE_string("markdown", None, "Also write the suites' results tables to this file.")
  flags.DEFINE_string("log_samples", None, "Also write the suites' per-example scores (JSONL).")


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from foundation import defaults as common  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a restore at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  overrides = list(f.override) + ([f"eval.steps={f.eval_steps}"] if f.eval_steps else [])
  eval_config = common.evaluate_config()
  # With --suites and no --tasks, only the suites run.
  tasks = "" if f.suites and not f["tasks"].present else f.tasks
  eval_config.update(tasks=tasks, shots=f.shots, metric=f.metric, limit=f.limit,
                     max_new_tokens=f.max_new_tokens, batch_size=f.batch_size,
                     delimiter=f.delimiter)
  try:
    steps = checkpoint_steps(f.workdir, f.steps, f.step)
    session = generate_lib.load(f.workdir, steps[0], overrides)
    evaluators = make_evaluators(session.config, session.model, session.mesh, session.tokenizer,
                                 eval_config, f.workdir)
    if f.suites:
      evaluators += suite_evaluators(f.suites, session)
    all_results, tables, samples = [], [], []
    for step in steps:
      params = session.params
      if step != session.step:
        params, step = generate_lib.restore_params(f.workdir, abstract_like(params), step)
      results = {"step": step, **run(evaluators, params)}
      print_results(results, evaluators)
      names = [e.name for e in evaluators if isinstance(e, BenchmarkSuite)]
      if names:
        tables.append(suites_lib.results_table(step, results, names))
        print(tables[-1])
      samples += [dict(step=step, suite=e.name, doc=i, **sample) for e in evaluators
                  if isinstance(e, BenchmarkSuite) for i, sample in enumerate(e.samples)]
      all_results.append(results)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  if f.output:
    with open(f.output, "w") as out:
      json.dump(all_results[0] if len(all_results) == 1 else all_results, out, indent=2)
  if f.markdown:
    with open(f.markdown, "w") as out:
      out.write("\n".join(tables))
  if f.log_samples:
    with open(f.log_samples, "w") as out:
      out.writelines(json.dumps(s) + "\n" for s in samples)
  sys.stdout.flush()


def print_results(results: dict, evaluators) -> None:
  for name, value in results.items():
    if "/confusion/" not in name and "_stderr" not in name:  # tables show those
      print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
  for evaluator in evaluators:
    if isinstance(evaluator, Classification):
      print(evaluator.table())


def checkpoint_steps(workdir: str, steps: str | None, step: int | None) -> list:
  """The checkpoints --steps names ('all', or '100,200'), else [--step] (None: the latest)."""
  if not steps:
    return [step]
  directory = os.path.join(workdir, "checkpoints")
  have = sorted(int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else [])
                if d.isdigit())
  if steps == "all":
    if not have:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return have
  try:
    wanted = [int(s) for s in steps.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--steps={steps!r}: use 'all' or checkpoint steps like '100,200'") from None
  missing = [s for s in wanted if s not in have]
  if missing or not wanted:
    raise ValueError(f"--steps={steps!r}: no checkpoint {missing} in {directory} (it has {have})")
  return wanted


def abstract_like(params):
  """Shapes, dtypes and shardings of `params`: the target another checkpoint restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      params)


def suite_evaluators(spec: str, session) -> list:
  """A BenchmarkSuite per suite of the config file `spec` (configs/suites.py[:args])."""
  from foundation import config as config_lib  # pylint: disable=g-import-not-at-top
  suite_config = config_lib.load_config_file(spec)
  runtime = Runtime(session.model, session.mesh, mesh_lib.rules(session.config), session.tokenizer)
  return [BenchmarkSuite(name, path, runtime, limit=suite_config.limit,
                         batch_size=suite_config.batch_size,
                         max_gen_toks=suite_config.max_gen_toks,
                         num_fewshot=suite_config.num_fewshot)
          for name, path in suite_config.suites.items()]


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
