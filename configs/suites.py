r"""Which benchmark suites `python -m foundation.evaluate --suites` runs, and the files it reads.

  # the standard suites from files downloaded under data/benchmarks (the layout below)
  python -m foundation.evaluate --workdir runs/llama1b --suites configs/suites.py
  # some of them, from another folder, the first 500 examples of each
  python -m foundation.evaluate --workdir runs/llama1b \
      --suites configs/suites.py:data_dir=/data/bench,only=hellaswag+arc_easy+gsm8k,limit=500
  # the few hand-written examples of tests/fixtures/suites (a quick check of the pipeline)
  python -m foundation.evaluate --workdir runs/llama1b --suites configs/suites.py:fixtures

Arguments after the colon: `data_dir=` the folder the paths below are relative to (default
data/benchmarks); `only=` suite names joined by '+'; `limit=` examples per suite (0: all);
`fixtures` the test fixtures' files instead. One suite from any file: `--tasks suite:NAME:FILE`.
The formats each suite reads (the original release's JSONL/CSV, or the Hugging Face dataset's
parquet) are in docs/evaluation.md.
"""

import os

import ml_collections

from configs import common

# suite: its file under data_dir (either of the layouts a publisher distributes; see
# docs/evaluation.md for where each comes from)
FILES = {
    "hellaswag": "hellaswag/hellaswag_val.jsonl",                          # rowanz/hellaswag data/
    "arc_easy": "ai2_arc/ARC-Easy/test-00000-of-00001.parquet",             # allenai/ai2_arc
    "arc_challenge": "ai2_arc/ARC-Challenge/test-00000-of-00001.parquet",   # allenai/ai2_arc
    "piqa": "piqa/valid.jsonl",                                 # + valid-labels.lst beside it
    "winogrande": "winogrande_1.1/dev.jsonl",                   # allenai/winogrande release
    "mmlu": "mmlu/all/test-00000-of-00001.parquet",             # cais/mmlu, config 'all'
    "lambada": "lambada_openai/lambada_test.jsonl",             # EleutherAI/lambada_openai
    "gsm8k": "gsm8k/test.jsonl",                                # openai/grade-school-math data/
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "suites")
FIXTURES = {  # a few hand-written examples of each, in the publishers' formats
    "hellaswag": "hellaswag_val.jsonl",
    "arc_easy": "ARC-Easy-Test.jsonl",
    "arc_challenge": "ARC-Challenge-test.parquet",
    "piqa": "piqa_valid.jsonl",
    "winogrande": "winogrande_dev.jsonl",
    "mmlu": "mmlu-test.parquet",
    "lambada": "lambada_test.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, data_dir="data/benchmarks", only="", limit="0", fixtures=False)
  files, data_dir = (FIXTURES, FIXTURE_DIR) if args["fixtures"] else (FILES, args["data_dir"])
  names = [n for n in args["only"].split("+") if n] or list(files)
  for name in names:
    if name not in files:
      raise ValueError(f"config argument only: {name!r} is not a suite"
                       f"{common.did_you_mean(name, files)}; suites: {', '.join(files)}")
  return ml_collections.ConfigDict(dict(
      suites={name: os.path.join(data_dir, files[name]) for name in names},
      limit=int(args["limit"]),  # examples per suite; 0: all
      num_fewshot=0,             # the harness's zero-shot prompts (only 0 is implemented)
      batch_size=8,              # rows per scoring batch, rounded up to the data-parallel degree
      max_gen_toks=256,          # gsm8k: the longest answer, in tokens (the harness's default)
  ))
