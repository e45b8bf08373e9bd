r"""The standard benchmark suites, read from their publishers' files and scored as
lm-evaluation-harness (v0.4) scores them.

  python -m foundation.evaluate --workdir runs/llama1b --suites configs/suites.py
  python -m foundation.evaluate --workdir runs/llama1b \
      --tasks suite:hellaswag:data/hellaswag_val.jsonl,suite:gsm8k:data/gsm8k/test.jsonl

| suite | files (the original release, or the Hugging Face dataset's parquet) | metrics |
| --- | --- | --- |
| hellaswag | rowanz/hellaswag `hellaswag_val.jsonl`; `Rowan/hellaswag` parquet | acc, acc_norm |
| arc_easy, arc_challenge | AI2 `ARC-Easy-Test.jsonl`; `allenai/ai2_arc` parquet | acc, acc_norm |
| piqa | `valid.jsonl` + `valid-labels.lst`; `baber/piqa` parquet | acc, acc_norm |
| winogrande | `dev.jsonl`; `allenai/winogrande` parquet | acc (partial scoring) |
| mmlu | `cais/mmlu` parquet; the original `data/test/SUBJECT_test.csv` | acc |
| lambada | OpenAI's `lambada_test.jsonl`; `EleutherAI/lambada_openai` parquet | perplexity, acc |
| gsm8k | `grade_school_math/data/test.jsonl`; `openai/gsm8k` parquet | exact_match (2 filters) |

Each suite turns a record into the harness's requests with its task YAML's templates
(doc_to_text / doc_to_choice / doc_to_target, target delimiter " ", zero-shot), tokenizes each
(context, continuation) pair the way its HFLM does (`encode_pair`) and scores it with
evaluate.score; the golden fixtures of tests/test_suites.py are the harness's own outputs.
"""

import csv
import dataclasses
import json
import math
import os
import re
import string
from typing import Callable, Sequence

import numpy as np

TARGET_DELIMITER = " "          # lm-eval's default target_delimiter
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml generation_kwargs.until
MAX_GEN_TOKS = 256              # lm-eval's default max_gen_toks
# gsm8k.yaml's exact_match: regexes applied to prediction and reference, then lower case.
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
GSM8K_FILTERS = {               # gsm8k.yaml filter_list: (regex, which match)
    "strict-match": (r"#### (\-?[0-9\.\,]+)", 0),
    "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
}


@dataclasses.dataclass
class Doc:
  """One example as the harness's requests.

  requests: (context, continuation) pairs to score (multiple choice: one per choice; lambada: one);
  prompt: the context to continue (generation); gold: the right choice's index, or the reference.
  choices: the strings whose lengths normalise acc_norm (the harness's doc_to_choice).
  """
  requests: list[tuple[str, str]]
  gold: object
  choices: list[str] = dataclasses.field(default_factory=list)
  prompt: str = ""


# ------------------------------------------------------------------ reading the files

def read_records(path: str) -> list[dict]:
  """The rows of a .jsonl / .json (JSON Lines), .parquet or .csv (MMLU's original) file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such suite file")
  ext = path.rsplit(".", 1)[-1].lower()
  if ext == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    rows = pq.read_table(path).to_pylist()
  elif ext == "csv":
    with open(path, newline="", encoding="utf-8") as f:
      rows = [{"_csv": row} for row in csv.reader(f)]
  elif ext in ("jsonl", "json"):
    rows = []
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
  else:
    raise ValueError(f"{path}: a suite file is .jsonl, .parquet or .csv, not .{ext}")
  if not rows:
    raise ValueError(f"{path}: no records")
  return rows


def _need(row: dict, fields: Sequence[str], path: str, i: int, suite: str) -> None:
  missing = [f for f in fields if f not in row]
  if missing:
    raise ValueError(f"{path}: record {i + 1} has no {missing} for suite {suite!r} (it has "
                     f"{sorted(row)}; {SUITES[suite].layout})")


# ------------------------------------------------------------------ the suites' templates

def hellaswag_preprocess(text: str) -> str:
  """lm_eval/tasks/hellaswag/utils.py: WikiHow's bracketed artifacts out."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> Doc:
  ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
  query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
  choices = [hellaswag_preprocess(e) for e in row["endings"]]
  return _choice_doc(query, choices, int(row["label"]))


def arc_doc(row: dict) -> Doc:
  question, choices = row["question"], row.get("choices")
  if isinstance(question, dict):  # AI2's release: {"stem", "choices": [{"text", "label"}]}
    choices = {"text": [c["text"] for c in question["choices"]],
               "label": [c["label"] for c in question["choices"]]}
    question = question["stem"]
  gold = list(choices["label"]).index(row["answerKey"])
  return _choice_doc(f"Question: {question}\nAnswer:", list(choices["text"]), gold)


def piqa_doc(row: dict) -> Doc:
  return _choice_doc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]],
                     int(row["label"]))


def winogrande_doc(row: dict) -> Doc:
  """Partial scoring: the sentence up to the blank with each option is a context, and the rest of
  the sentence the continuation scored after each (preprocess_winogrande.py)."""
  sentence = row["sentence"]
  blank = sentence.index("_")
  contexts = [sentence[:blank] + option for option in (row["option1"], row["option2"])]
  target = sentence[blank + 1:].strip()
  return Doc([(c, TARGET_DELIMITER + target) for c in contexts], {"1": 0, "2": 1}[row["answer"]],
             contexts)


def mmlu_doc(row: dict) -> Doc:
  """_default_template_yaml, with the subject's description (_generate_configs.py) first."""
  choices = row["choices"]
  description = ("The following are multiple choice questions (with answers) about "
                 f"{' '.join(row['subject'].split('_'))}.\n\n")
  text = (f"{row['question'].strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\n"
          f"D. {choices[3]}\nAnswer:")
  return _choice_doc(description + text, ["A", "B", "C", "D"], int(row["answer"]))


def lambada_doc(row: dict) -> Doc:
  words = row["text"].split(" ")
  return Doc([(" ".join(words[:-1]), " " + words[-1])], None)


def gsm8k_doc(row: dict) -> Doc:
  return Doc([], row["answer"], prompt=f"Question: {row['question']}\nAnswer:")


def _choice_doc(context: str, choices: list[str], gold: int) -> Doc:
  return Doc([(context, TARGET_DELIMITER + c) for c in choices], gold, choices)


# ------------------------------------------------------------------ publishers' variants

def _piqa_labels(rows: list[dict], path: str) -> list[dict]:
  """The original release keeps PIQA's labels apart: valid.jsonl + valid-labels.lst."""
  if rows and "label" not in rows[0]:
    labels_path = re.sub(r"\.jsonl?$", "", path) + "-labels.lst"
    if not os.path.isfile(labels_path):
      raise ValueError(f"{path}: PIQA records without 'label' need their labels file "
                       f"{labels_path} (the release's valid-labels.lst beside valid.jsonl)")
    with open(labels_path) as f:
      labels = [line.strip() for line in f if line.strip()]
    if len(labels) != len(rows):
      raise ValueError(f"{labels_path}: {len(labels)} labels for {len(rows)} records in {path}")
    rows = [dict(row, label=int(label)) for row, label in zip(rows, labels)]
  return rows


def _mmlu_csv(rows: list[dict], path: str) -> list[dict]:
  """The original MMLU release: data/test/SUBJECT_test.csv, rows question,A,B,C,D,letter."""
  if rows and "_csv" in rows[0]:
    subject = re.sub(r"_(test|dev|val)$", "", os.path.splitext(os.path.basename(path))[0])
    out = []
    for i, row in enumerate(rows):
      cells = row["_csv"]
      if len(cells) != 6 or cells[5] not in "ABCD" or not cells[5]:
        raise ValueError(f"{path}:{i + 1}: an MMLU CSV row is question,A,B,C,D,answer letter; "
                         f"got {len(cells)} cells")
      out.append(dict(question=cells[0], subject=subject, choices=cells[1:5],
                      answer="ABCD".index(cells[5])))
    rows = out
  return rows


@dataclasses.dataclass(frozen=True)
class Suite:
  kind: str                    # 'multiple_choice', 'loglikelihood' or 'generate_until'
  fields: tuple[str, ...]      # what every record needs
  make_doc: Callable[[dict], Doc]
  metrics: tuple[str, ...]
  layout: str                  # the files it reads, for error messages
  prepare: Callable[[list[dict], str], list[dict]] = lambda rows, path: rows


SUITES = {
    "hellaswag": Suite("multiple_choice", ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                       hellaswag_doc, ("acc", "acc_norm"),
                       "hellaswag_val.jsonl or Rowan/hellaswag parquet"),
    "arc_easy": Suite("multiple_choice", ("question", "answerKey"), arc_doc, ("acc", "acc_norm"),
                      "ARC-Easy-*.jsonl or allenai/ai2_arc parquet"),
    "arc_challenge": Suite("multiple_choice", ("question", "answerKey"), arc_doc,
                           ("acc", "acc_norm"), "ARC-Challenge-*.jsonl or allenai/ai2_arc parquet"),
    "piqa": Suite("multiple_choice", ("goal", "sol1", "sol2", "label"), piqa_doc,
                  ("acc", "acc_norm"), "valid.jsonl + valid-labels.lst, or baber/piqa parquet",
                  _piqa_labels),
    "winogrande": Suite("multiple_choice", ("sentence", "option1", "option2", "answer"),
                        winogrande_doc, ("acc",), "dev.jsonl or allenai/winogrande parquet"),
    "mmlu": Suite("multiple_choice", ("question", "subject", "choices", "answer"), mmlu_doc,
                  ("acc",), "cais/mmlu parquet or the original data/test/SUBJECT_test.csv",
                  _mmlu_csv),
    "lambada": Suite("loglikelihood", ("text",), lambada_doc, ("perplexity", "acc"),
                     "lambada_test.jsonl or EleutherAI/lambada_openai parquet"),
    "gsm8k": Suite("generate_until", ("question", "answer"), gsm8k_doc,
                   ("exact_match,strict-match", "exact_match,flexible-extract"),
                   "test.jsonl or openai/gsm8k parquet"),
}


def read_docs(suite: str, path: str, limit: int = 0) -> list[Doc]:
  """The suite's docs from `path` (at most `limit`; 0: all)."""
  if suite not in SUITES:
    raise ValueError(f"suite {suite!r} is not one of {sorted(SUITES)}")
  spec = SUITES[suite]
  rows = spec.prepare(read_records(path), path)
  rows = rows[:limit] if limit else rows
  docs = []
  for i, row in enumerate(rows):
    _need(row, spec.fields, path, i, suite)
    try:
      docs.append(spec.make_doc(row))
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
      raise ValueError(f"{path}: record {i + 1} is not a {suite} record ({type(e).__name__}: "
                       f"{e}; {spec.layout})") from None
  return docs


# ------------------------------------------------------------------ tokenizing as HFLM does

class HarnessEncoder:
  """Token ids as lm-eval's HFLM makes them (add_bos_token unset): the tokenizer's own special
  tokens (a Hugging Face tokenizer.json's post-processor: BOS for LLaMA, none for Qwen2; our byte
  and SentencePiece tokenizers: BOS), and a pair encoded whole then split (`encode_pair`)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._hf = None
    if hasattr(tokenizer, "json_bytes"):  # foundation.data.tokenizers.HFTokenizer
      from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
      self._hf = Tokenizer.from_str(tokenizer.json_bytes.decode("utf-8"))

  def encode(self, text: str) -> list[int]:
    if self._hf is not None:
      return self._hf.encode(text, add_special_tokens=True).ids
    return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

  def eos_text(self) -> str:
    """The EOS token's text, a stop sequence of the harness's generation ('' if it has none)."""
    if self._hf is None:
      return ""
    return self._hf.id_to_token(self.tokenizer.eos_id) or ""

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval.api.model.TemplateLM._encode_pair: trailing spaces of the context move to the
    continuation; context + continuation is encoded whole and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = self.encode(context + continuation), self.encode(context)
    return context_ids, whole[len(context_ids):]


# ------------------------------------------------------------------ scoring as the harness does

def choice_scores(doc: Doc, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
  """acc (highest log-likelihood), acc_norm (highest per character of the choice, the harness's
  len(choice)); np.argmax takes the first of equals, as the harness's does."""
  lls = np.array([r[0] for r in results])
  lengths = np.array([float(len(c)) for c in doc.choices])
  return {"acc": float(np.argmax(lls) == doc.gold),
          "acc_norm": float(np.argmax(lls / lengths) == doc.gold)}


def regex_filter(response: str, pattern: str, group_select: int) -> str:
  """lm_eval.filters.extraction.RegexFilter (fallback '[invalid]')."""
  match = re.findall(pattern, response)
  if not match:
    return "[invalid]"
  match = match[group_select]
  if isinstance(match, tuple):
    match = [m for m in match if m]
    match = match[0] if match else "[invalid]"
  return match.strip()


def exact_match(prediction: str, reference: str, regexes_to_ignore=GSM8K_IGNORE,
                ignore_case: bool = True, ignore_punctuation: bool = False) -> float:
  """lm_eval.api.metrics.exact_match_hf_evaluate on one pair."""
  for pattern in regexes_to_ignore:
    prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
  if ignore_case:
    prediction, reference = prediction.lower(), reference.lower()
  if ignore_punctuation:
    table = str.maketrans("", "", string.punctuation)
    prediction, reference = prediction.translate(table), reference.translate(table)
  return float(prediction == reference)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
  """lm_eval.models.utils.postprocess_generated_text: the text before each stop sequence."""
  for stop in stops:
    if stop:
      text = text.split(stop)[0]
  return text


def gsm8k_scores(response: str, reference: str) -> dict[str, object]:
  out = {}
  for name, (pattern, group) in GSM8K_FILTERS.items():
    filtered = regex_filter(response, pattern, group)
    out[f"exact_match,{name}"] = exact_match(filtered, reference)
    out[f"filtered,{name}"] = filtered
  return out


def mean_stderr(values: Sequence[float]) -> float:
  """lm_eval.api.metrics.mean_stderr: the sample standard deviation over sqrt(n)."""
  n = len(values)
  if n < 2:
    return float("nan")
  mu = sum(values) / n
  return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def aggregate(suite: str, samples: list[dict]) -> dict[str, float]:
  """The suite's metrics over per-example scores: means, and LAMBADA's perplexity
  exp(-mean log-likelihood) (the harness's `perplexity` aggregation)."""
  out = {}
  for metric in SUITES[suite].metrics:
    if metric == "perplexity":
      out[metric] = math.exp(-np.mean([s["loglikelihood"] for s in samples]))
    else:
      values = [s[metric] for s in samples]
      out[metric] = float(np.mean(values))
      out[stderr_name(metric)] = mean_stderr(values)
  return out


def stderr_name(metric: str) -> str:
  """The harness's key of a metric's standard error: 'acc_stderr', 'exact_match_stderr,FILTER'."""
  base, comma, name = metric.partition(",")
  return f"{base}_stderr{comma}{name}"


def results_table(step, results: dict, names: Sequence[str]) -> str:
  """The suites' figures of one checkpoint as a markdown table, in the harness's layout."""
  lines = [f"### step {step}", "",
           "| Suite | Filter | n-shot | Metric | Value | Stderr | Examples |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
  for name in names:
    for metric in SUITES[name].metrics:
      base, _, filter_name = metric.partition(",")
      stderr = results.get(f"{name}/{stderr_name(metric)}", float("nan"))
      lines.append(f"| {name} | {filter_name or 'none'} | 0 | {base} | "
                   f"{results[f'{name}/{metric}']:.4f} | "
                   f"{'N/A' if math.isnan(stderr) else f'± {stderr:.4f}'} | "
                   f"{int(results[f'{name}/examples'])} |")
  return "\n".join(lines) + "\n"


def score_docs(suite: str, docs: Sequence[Doc], results=None, responses=None) -> list[dict]:
  """Per-example scores from the model's outputs: `results`, (log-likelihood, is greedy) of every
  request of every doc in order; or `responses`, a generation suite's answer texts (cut at the
  stop sequences), one per doc."""
  kind = SUITES[suite].kind
  if kind == "generate_until":
    return [dict(response=r, **gsm8k_scores(r, d.gold)) for d, r in zip(docs, responses)]
  samples, k = [], 0
  for doc in docs:
    mine = results[k:k + len(doc.requests)]
    k += len(doc.requests)
    sample = {"loglikelihoods": [float(r[0]) for r in mine], "greedy": [bool(r[1]) for r in mine]}
    if kind == "multiple_choice":
      sample.update(choice_scores(doc, mine))
    else:  # lambada: the last word's log-likelihood, and whether greedy decoding gives it
      sample.update(loglikelihood=float(mine[0][0]), acc=float(mine[0][1]))
    samples.append(sample)
  return samples
