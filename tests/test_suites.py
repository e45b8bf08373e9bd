"""The standard suites against lm-evaluation-harness's own outputs (golden fixtures, no torch).

tests/fixtures/make_suite_fixtures.py ran lm-eval 0.4.13's official task YAMLs on the hand-written
files of tests/fixtures/suites/ with a tiny random LLaMA (tests/fixtures/suites/model/) and kept
its per-example requests, token ids, log-likelihoods, greedy answers and scores in golden.json.
Here the same model is imported into foundation and every one of those is recomputed.
"""

import collections
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from foundation import evaluate
from foundation import hf
from foundation import mesh as mesh_lib
from foundation import suites
from foundation.data import tokenizers
from foundation.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "suites")
MODEL = os.path.join(FIXTURES, "model")
sys.path.insert(0, ROOT)
from configs import suites as suites_config  # pylint: disable=wrong-import-position

with open(os.path.join(FIXTURES, "golden.json")) as _f:
  GOLDEN = json.load(_f)
FILES = {name: os.path.join(FIXTURES, f) for name, f in suites_config.FIXTURES.items()}
LOGLIKELIHOOD_SUITES = [s for s in FILES if s != "gsm8k"]


def golden_samples(suite: str) -> list[dict]:
  """lm-eval's samples of a suite in file order (mmlu: its subject tasks, alphabetical as the
  file is; gsm8k: one per doc, its samples of both filters merged)."""
  samples = sorted(GOLDEN["suites"][suite]["samples"], key=lambda s: (s["task"], s["doc_id"]))
  if suite != "gsm8k":
    return samples
  merged = collections.OrderedDict()
  for s in samples:
    merged.setdefault(s["doc_id"], dict(s, filtered={}, exact_match={}))
    merged[s["doc_id"]]["filtered"][s["filter"]] = s["filtered"]
    merged[s["doc_id"]]["exact_match"][s["filter"]] = s["exact_match"]
  return list(merged.values())


def harness_metric(suite: str, metric: str) -> float:
  """The harness's aggregate over the suite's tasks (mmlu: weighted by size, as its group)."""
  results = GOLDEN["suites"][suite]["results"].values()
  key = metric if "," in metric else f"{metric},none"
  if metric == "perplexity":
    (only,) = results
    return only[key]
  return sum(r[key] * r["sample_len"] for r in results) / sum(r["sample_len"] for r in results)


@pytest.fixture(scope="module")
def runtime_and_params():
  """The fixture model imported (float32) on the 8 devices, with its tokenizer.json."""
  config = hf.import_config(hf.read_json(os.path.join(MODEL, "config.json")), "test", "float32")
  model = transformer.Transformer(transformer.ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)
  from foundation import generate  # pylint: disable=g-import-not-at-top
  params = hf.load_params(MODEL, model.cfg, generate.abstract_params(model, config, mesh))
  tokenizer = tokenizers.HFTokenizer(os.path.join(MODEL, "tokenizer.json"))
  return evaluate.Runtime(model, mesh, mesh_lib.rules(config), tokenizer), params


@pytest.mark.parametrize("suite", list(FILES))
def test_requests_are_the_harness_prompts(suite):
  """Our readers of the publishers' files give the harness's exact (context, continuation)
  strings, and HarnessEncoder its token ids (HFLM._encode_pair; the gsm8k prompt's)."""
  docs = suites.read_docs(suite, FILES[suite])
  golden = golden_samples(suite)
  assert len(docs) == len(golden)
  encoder = suites.HarnessEncoder(tokenizers.HFTokenizer(os.path.join(MODEL, "tokenizer.json")))
  for doc, want in zip(docs, golden):
    if suite == "gsm8k":
      assert doc.prompt == want["prompt"]
      assert encoder.encode(doc.prompt) == want["prompt_ids"]
      continue
    assert [list(r) for r in doc.requests] == want["requests"]
    assert [[list(a), list(b)] for a, b in (encoder.encode_pair(c, x) for c, x in doc.requests)] \
        == want["ids"]


@pytest.fixture(scope="module")
def scored(runtime_and_params):
  """Every log-likelihood suite run once through its evaluator: {suite: (metrics, samples)}."""
  runtime, params = runtime_and_params
  out = {}
  for suite in LOGLIKELIHOOD_SUITES:
    evaluator = evaluate.BenchmarkSuite(suite, FILES[suite], runtime, batch_size=16)
    out[suite] = (dict(evaluator.run(params)), evaluator.samples)
  return out


@pytest.mark.parametrize("suite", LOGLIKELIHOOD_SUITES)
def test_loglikelihoods_and_scores_equal_the_harness(suite, scored):
  metrics, samples = scored[suite]
  golden = golden_samples(suite)
  got = np.array([ll for s in samples for ll in s["loglikelihoods"]])
  want = np.array([ll for s in golden for ll in s["loglikelihoods"]])
  error = float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
  print(f"{suite}: {len(got)} log-likelihoods, max relative error {error:.1e}")
  assert error < 1e-5, error
  assert [s["greedy"] for s in samples] == [s["greedy"] for s in golden]
  for metric in ("acc", "acc_norm"):
    if metric in golden[0]:
      assert [s[metric] for s in samples] == [s[metric] for s in golden], metric
  for metric in suites.SUITES[suite].metrics:
    want = harness_metric(suite, metric)
    if metric == "perplexity":
      assert math.isclose(metrics[f"{suite}/{metric}"], want, rel_tol=1e-4), (metric, want)
    else:
      assert metrics[f"{suite}/{metric}"] == pytest.approx(want, abs=1e-12), (metric, want)
  assert metrics[f"{suite}/examples"] == len(golden)
  (results,) = GOLDEN["suites"][suite]["results"].values() if suite != "mmlu" else [{}]
  for key, want in results.items():
    if "_stderr" in key:  # the harness's mean_stderr over the same per-example scores
      assert metrics[f"{suite}/{key.split(',')[0]}"] == pytest.approx(want, rel=1e-12), key


def test_choice_scores_on_made_loglikelihoods_equal_the_harness():
  """acc and acc_norm (per character of the choice, no delimiter) as the harness's
  process_results gave them for made log-likelihoods, where the normalisations disagree."""
  docs = {suite: suites.read_docs(suite, FILES[suite]) for suite in FILES}
  first = {}  # the index in our file of each harness task's first doc (mmlu: per subject)
  for case in GOLDEN["choice_scoring"]:
    first.setdefault((case["suite"], case["task"]), sum(
        1 for s in golden_samples(case["suite"]) if s["task"] < case["task"]))
    doc = docs[case["suite"]][first[(case["suite"], case["task"])] + case["doc_id"]]
    got = suites.choice_scores(doc, [(ll, False) for ll in case["lls"]])
    for metric in ("acc", "acc_norm"):
      if metric in case:
        assert got[metric] == case[metric], (case, metric)
  disagree = sum(1 for c in GOLDEN["choice_scoring"] if c.get("acc_norm", c["acc"]) != c["acc"])
  assert disagree >= 5, disagree


def test_gsm8k_answers_and_exact_match_equal_the_harness(runtime_and_params):
  """Greedy answers (256 new tokens at most, EOS, the stop sequences), both filters and
  exact_match: the harness's strings and scores exactly."""
  runtime, params = runtime_and_params
  evaluator = evaluate.BenchmarkSuite("gsm8k", FILES["gsm8k"], runtime)
  metrics = dict(evaluator.run(params))
  for got, want in zip(evaluator.samples, golden_samples("gsm8k"), strict=True):
    assert got["response"] == want["response"]
    for name in suites.GSM8K_FILTERS:
      assert got[f"filtered,{name}"] == want["filtered"][name]
      assert got[f"exact_match,{name}"] == want["exact_match"][name]
  for metric in suites.SUITES["gsm8k"].metrics:
    assert metrics[f"gsm8k/{metric}"] == harness_metric("gsm8k", metric)


def test_gsm8k_filters_and_normalisation_on_made_answers():
  """The regex filters and exact_match's normalisation (',', '$', '#### ', a final '.', case) on
  answers that do match, as lm-eval's own functions scored them."""
  for case in GOLDEN["gsm8k_scoring"]:
    got = suites.gsm8k_scores(case["response"], case["reference"])
    for name in suites.GSM8K_FILTERS:
      assert got[f"filtered,{name}"] == case[name]["filtered"], (case, name)
      assert got[f"exact_match,{name}"] == case[name]["exact_match"], (case, name)
  assert sum(c["strict-match"]["exact_match"] for c in GOLDEN["gsm8k_scoring"]) >= 3


def test_mmlu_original_csv_reads_as_the_parquet(tmp_path):
  """The original release (data/test/SUBJECT_test.csv, no header, answer letter) gives the same
  docs as the cais/mmlu parquet."""
  docs = suites.read_docs("mmlu", FILES["mmlu"])
  rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "mmlu_hf_rows.jsonl"))]
  import csv  # pylint: disable=g-import-not-at-top
  by_subject = collections.defaultdict(list)
  for row in rows:
    by_subject[row["subject"]].append(row)
  csv_docs = []
  for subject, subject_rows in sorted(by_subject.items()):
    path = tmp_path / f"{subject}_test.csv"
    with open(path, "w", newline="") as f:
      for row in subject_rows:
        csv.writer(f).writerow([row["question"], *row["choices"], "ABCD"[row["answer"]]])
    csv_docs += suites.read_docs("mmlu", str(path))
  assert csv_docs == docs


def test_bad_files_are_one_line_errors(tmp_path):
  bad = tmp_path / "hellaswag.jsonl"
  bad.write_text('{"ctx_a": "x", "endings": ["a", "b"], "label": 0}\n')
  with pytest.raises(ValueError, match=r"hellaswag.jsonl: record 1 has no \['activity_label', "
                                       r"'ctx_b'\] for suite 'hellaswag'"):
    suites.read_docs("hellaswag", str(bad))
  lonely = tmp_path / "valid.jsonl"
  lonely.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
  with pytest.raises(ValueError, match="valid-labels.lst"):
    suites.read_docs("piqa", str(lonely))
  with pytest.raises(ValueError, match="is not one of"):
    suites.read_docs("hellaswag2", str(bad))
  with pytest.raises(ValueError, match="did you mean 'piqa'"):
    suites_config.get_config("only=piqaa")
  with pytest.raises(ValueError, match="num_fewshot=5; only the harness's zero-shot"):
    evaluate.BenchmarkSuite("piqa", FILES["piqa"], runtime=None, num_fewshot=5)


def test_command_line_writes_the_tables(tmp_path):
  """`python -m foundation.evaluate --suites configs/suites.py:fixtures` on an imported workdir:
  the markdown table and the JSON hold the harness's figures."""
  workdir = str(tmp_path / "imported")
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, "-m", "foundation.hf", "import", "--source", MODEL, "--workdir",
                  workdir, "--template", "test", "--dtype", "float32", "--params_only"],
                 check=True, env=env, capture_output=True)
  only = "winogrande+mmlu+lambada"
  done = subprocess.run(
      [sys.executable, "-m", "foundation.evaluate", "--workdir", workdir,
       "--suites", f"configs/suites.py:fixtures,only={only}", "--steps", "all",
       "--markdown", str(tmp_path / "r.md"), "--output", str(tmp_path / "r.json"),
       "--log_samples", str(tmp_path / "samples.jsonl")],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  table = (tmp_path / "r.md").read_text()
  assert "| Suite | Filter | n-shot | Metric | Value | Stderr | Examples |" in table
  results = json.loads((tmp_path / "r.json").read_text())
  assert results["step"] == 0
  assert results["winogrande/acc"] == harness_metric("winogrande", "acc")
  assert results["mmlu/acc"] == harness_metric("mmlu", "acc")
  assert math.isclose(results["lambada/perplexity"], harness_metric("lambada", "perplexity"),
                      rel_tol=1e-4)
  assert f"| mmlu | none | 0 | acc | {results['mmlu/acc']:.4f} |" in table
  assert table in done.stdout
  logged = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
  order = sorted(only.split("+"))  # the config's suites, by name
  assert [s["suite"] for s in logged] == ["lambada"] * 3 + ["mmlu"] * 4 + ["winogrande"] * 4
  want = [ll for suite in order for s in golden_samples(suite) for ll in s["loglikelihoods"]]
  np.testing.assert_allclose([ll for s in logged for ll in s["loglikelihoods"]], want, rtol=1e-5)
