r"""Transfer with the ViT: an encoder pre-trained on five of the embedded shapes, fine-tuned with a
new head on the other five, against the same model trained from scratch on the same budget.

  python benchmarks/vit_transfer.py [--pretrain_steps 600] [--steps 300] [--num_train 1000]

Three `python -m foundation.train` runs of configs/vit.py:size=tiny (each printed before it
starts): pre-training on PRETRAIN classes; fine-tuning on FINETUNE classes from its params with
`init_from_skip=head/.*` (a fresh 5-way head; the encoder loaded); and scratch on FINETUNE.
The fine-tuning runs see only --num_train images of the whole set (about half of them of the
five classes). Writes benchmarks/results/vit-transfer.json (figures, commands, versions).
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "ring,frame,diamond,x,vbar"
FINETUNE = "circle,square,triangle,plus,hbar"


def train(workdir: str, *flags: str) -> tuple[dict, list[str], float]:
  """Runs the trainer; returns (the last eval record, the command, seconds)."""
  command = [sys.executable, "-m", "foundation.train", "--config", "configs/vit.py:size=tiny",
             "--workdir", workdir, "--config.model.num_classes=5", *flags]
  print("$ " + shlex.join(command), flush=True)
  start = time.time()
  subprocess.run(command, cwd=ROOT, check=True)
  seconds = time.time() - start
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
             if line.strip()]
  evals = [r for r in records if r.get("split") == "eval"]
  return evals[-1], command, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain_steps", type=int, default=600)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--num_train", type=int, default=1000)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "vit-transfer"))
  parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "vit-transfer.json"))
  args = parser.parse_args()
  pre = os.path.join(args.workdir, "pretrain")
  budget = [f"--config.steps={args.steps}", f"--config.data.num_train={args.num_train}",
            f"--config.data.classes={FINETUNE}", f"--config.eval.every={args.steps}",
            f"--config.checkpoint.every={args.steps}"]
  runs = {"pretrain": train(pre, f"--config.steps={args.pretrain_steps}",
                            f"--config.data.classes={PRETRAIN}",
                            f"--config.eval.every={args.pretrain_steps}")}
  runs["finetune"] = train(os.path.join(args.workdir, "finetune"), *budget,
                           f"--config.init_from={pre}", "--config.init_from_skip=head/.*")
  runs["scratch"] = train(os.path.join(args.workdir, "scratch"), *budget)
  result = {name: {"eval": record, "command": shlex.join(command), "seconds": round(seconds, 1)}
            for name, (record, command, seconds) in runs.items()}
  import jax  # pylint: disable=g-import-not-at-top
  result["environment"] = {"jax": jax.__version__, "python": platform.python_version(),
                           "machine": platform.machine(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg()}
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  for name in ("pretrain", "finetune", "scratch"):
    e = result[name]["eval"]
    print(f"{name:>9}: held-out top-1 {e['accuracy']:.3f}, loss {e['loss']:.3f} "
          f"({result[name]['seconds']:.0f} s)")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
