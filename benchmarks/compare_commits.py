r"""Is one tree's train step slower than another's? Alternates `foundation.bench` of two trees.

  git worktree add ../wt-old b169949
  python benchmarks/compare_commits.py --old ../wt-old --new . --rounds 3 \
      --json benchmarks/results/compare-commits.json \
      -- --config configs/lm.py:size=tiny --steps 20 --warmup 3

Each round runs the bench of both trees once, one after the other (the order flips every round, so
that a load that rises or falls through the run does not favour one tree), each with its own tree
as cwd and PYTHONPATH. On a shared machine one run's number says little; the median of the per-round
ratios new / old, each taken from two runs seconds apart, says more. The load average is recorded
before and after every run. Prints each round and writes the whole record as JSON.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile


def git_head(tree: str) -> str:
  out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True)
  dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True).stdout.strip()
  return out.stdout.strip() + (" (uncommitted changes)" if dirty else "")


def run_bench(tree: str, bench_args: list[str], python: str) -> dict:
  """One `python -m foundation.bench` of `tree` (cwd and PYTHONPATH); its record and load."""
  tree = os.path.abspath(tree)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    command = [python, "-m", "foundation.bench", *bench_args, f"--json={out}"]
    env = {**os.environ, "PYTHONPATH": tree}
    load_before = os.getloadavg()
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    load_after = os.getloadavg()
    if proc.returncode != 0 or not os.path.exists(out):
      raise SystemExit(f"bench of {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
      record = json.load(f)
  return {"tree": tree, "commit": git_head(tree), "tokens_per_sec": record["tokens_per_sec"],
          "step_ms_median": record["step_time"]["median"] * 1e3,
          "compile_seconds": record.get("compile_seconds"),
          "loss_last": record["loss"]["last"],
          "loadavg_before": list(load_before), "loadavg_after": list(load_after)}


def compare(old: str, new: str, bench_args: list[str], rounds: int, python: str) -> dict:
  per_round = []
  for i in range(rounds):
    order = [("old", old), ("new", new)] if i % 2 == 0 else [("new", new), ("old", old)]
    runs = {name: run_bench(tree, bench_args, python) for name, tree in order}
    ratio = runs["new"]["tokens_per_sec"] / runs["old"]["tokens_per_sec"]
    per_round.append({"round": i + 1, "order": [name for name, _ in order], **runs,
                      "ratio_new_over_old": ratio})
    print(f"round {i + 1} ({' then '.join(n for n, _ in order)}): old "
          f"{runs['old']['tokens_per_sec']:,.0f} tokens/s ({runs['old']['step_ms_median']:.1f} ms), "
          f"new {runs['new']['tokens_per_sec']:,.0f} tokens/s "
          f"({runs['new']['step_ms_median']:.1f} ms), new / old {ratio:.3f}; load average "
          f"{runs[order[0][0]]['loadavg_before'][0]:.2f} -> "
          f"{runs[order[1][0]]['loadavg_after'][0]:.2f}", flush=True)
  ratios = [r["ratio_new_over_old"] for r in per_round]
  loads = [x for r in per_round for name in ("old", "new")
           for x in (r[name]["loadavg_before"][0], r[name]["loadavg_after"][0])]
  return {"bench_args": bench_args, "rounds": per_round, "median_ratio_new_over_old":
          statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
          "loadavg_1min_range": [min(loads), max(loads)], "cpus": os.cpu_count(),
          "when_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--old", required=True, help="the old tree (a git worktree of the commit)")
  parser.add_argument("--new", default=".", help="the new tree (default: this one)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="", help="write the record here too")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("bench_args", nargs="*", help="after --: foundation.bench's arguments")
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds} must be >= 1")
  if not args.bench_args:
    parser.error("give foundation.bench's arguments after --, e.g. -- --config "
                 "configs/lm.py:size=tiny --steps 20 --warmup 3")
  result = compare(args.old, args.new, args.bench_args, args.rounds, args.python)
  result["command"] = "python benchmarks/compare_commits.py " + shlex.join(sys.argv[1:])
  print(f"median new / old over {args.rounds} rounds: {result['median_ratio_new_over_old']:.3f} "
        f"(range {result['min_ratio']:.3f} to {result['max_ratio']:.3f}); 1-minute load average "
        f"{result['loadavg_1min_range'][0]:.2f} to {result['loadavg_1min_range'][1]:.2f} on "
        f"{result['cpus']} CPUs")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
