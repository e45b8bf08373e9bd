r"""Fine-tuning the laptop demo's checkpoint vs training from scratch, at full length.

  python benchmarks/finetune_demo.py [--pretrained runs/tiny] [--out benchmarks/results/finetune-demo.json]

Uses the demo's checkpoint (README Quick start: `python -m foundation.train --config
configs/lm.py:size=tiny --workdir runs/tiny`; trained here first when the workdir has none), then
runs configs/finetune.py's defaults (300 steps) on 2,000 Python-function chat records
(foundation.data.sft.python_function_records): full SFT from the checkpoint, LoRA SFT from it
(rank 8 on q and v, the default; and on every projection), and full SFT from scratch with the
same budget. Prints a table and writes the JSON with the command,
the device and the versions. tests/test_finetune_train.py checks the same claim on a shortened run.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(args: list[str]) -> float:
  """Runs foundation.train as the user would; the seconds it took."""
  start = time.time()
  subprocess.run([sys.executable, "-m", "foundation.train", *args], cwd=ROOT, check=True)
  return time.time() - start


def last(workdir: str, split: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r["split"] == split][-1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrained", default="runs/tiny")
  parser.add_argument("--runs", default="runs/finetune-demo")
  parser.add_argument("--records", type=int, default=2000)
  parser.add_argument("--out", default="benchmarks/results/finetune-demo.json")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from foundation.data import sft  # pylint: disable=g-import-not-at-top

  command = shlex.join(["python", "benchmarks/finetune_demo.py", *sys.argv[1:]])
  print(command, flush=True)
  seconds = {}
  if not os.path.isdir(os.path.join(args.pretrained, "checkpoints")):
    seconds["pretrain"] = train(["--config", "configs/lm.py:size=tiny",
                                 "--workdir", args.pretrained])
  pretrained = last(args.pretrained, "eval")
  os.makedirs(args.runs, exist_ok=True)
  chats = os.path.join(args.runs, "functions.jsonl")
  with open(chats, "w") as f:
    for record in sft.python_function_records(args.records, seed=0):
      f.write(json.dumps(record) + "\n")
  runs = {"full SFT from the checkpoint": ("task=sft,base=tiny", args.pretrained, []),
          "LoRA (q, v) SFT from the checkpoint": (
              "task=sft,base=tiny,lora", args.pretrained, ["--config.lora.targets=attn/(q|v)$"]),
          "LoRA (all projections) SFT from the checkpoint": (
              "task=sft,base=tiny,lora", args.pretrained, []),
          "full SFT from scratch": ("task=sft,base=tiny", "", [])}
  results = {}
  for name, (config_arg, init_from, extra) in runs.items():
    workdir = os.path.join(args.runs, name.replace(" ", "_").replace(",", "").replace("(", "")
                           .replace(")", ""))
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run each time, not a resume
    seconds[name] = train(["--config", f"configs/finetune.py:{config_arg}", "--workdir", workdir,
                           f"--config.init_from={init_from}", f"--config.sft.train_path={chats}",
                           "--config.eval.every=100", *extra])
    results[name] = {"eval_loss": last(workdir, "eval")["loss"],
                     "train_loss": last(workdir, "train")["loss"], "workdir": workdir}
  record = {"command": command, "pretrained": {"workdir": args.pretrained,
                                                "step": pretrained["step"],
                                                "eval_loss": pretrained["loss"]},
            "records": args.records, "results": results, "seconds": seconds,
            "device": jax.devices()[0].device_kind, "platform": platform.platform(),
            "cpus": os.cpu_count(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"\n{command}\npre-trained: {args.pretrained} step {pretrained['step']}, eval loss "
        f"{pretrained['loss']:.3f}\n| run (300 SFT steps, batch 8 x 256) | SFT eval loss | time |\n"
        "| --- | --- | --- |")
  for name, r in results.items():
    print(f"| {name} | {r['eval_loss']:.3f} | {seconds[name]:.0f} s |")
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
