r"""The audio family's figures on the embedded synthesised sounds (12 classes), on 8 simulated CPU
devices: supervised held-out top-1, the masked pre-training's reconstruction loss, and linear
probes on the pre-trained encoder against one on a random encoder.

  python benchmarks/audio_transfer.py [--mae_steps 600] [--probe_steps 300]

Four `python -m foundation.train` runs of configs/audio.py:size=tiny (each printed before it
starts): `preset=supervised` (600 steps); `preset=mae`; `preset=probe` from the MAE run's encoder
(`--config.init_from`, the head and decoder skipped, the encoder frozen); and `preset=probe` on
the random encoder of a fresh init (the same frozen-encoder run without init_from). Writes
benchmarks/results/audio-transfer.json: each run's eval curve, wall and CPU seconds, the load.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, preset: str, *flags: str) -> dict:
  """Runs the trainer on 8 CPU devices; returns its eval curve, command, wall and CPU seconds."""
  command = [sys.executable, "-m", "foundation.train", "--config",
             f"configs/audio.py:size=tiny,preset={preset}", "--workdir", workdir, *flags]
  print("$ " + shlex.join(command), flush=True)
  env = {**os.environ, "PYTHONPATH": ROOT,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load, start = os.getloadavg()[0], time.time()
  subprocess.run(command, cwd=ROOT, check=True, env=env)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))
             if line.strip()]
  evals = {r["step"]: {k: round(v, 4) for k, v in r.items() if k in ("loss", "accuracy")}
           for r in records if r.get("split") == "eval"}
  return {"command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 " + shlex.join(command),
          "eval": evals, "wall_seconds": round(time.time() - start, 1),
          "cpu_seconds": round(after.ru_utime + after.ru_stime - before.ru_utime
                               - before.ru_stime, 1),
          "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--supervised_steps", type=int, default=600)
  parser.add_argument("--mae_steps", type=int, default=600)
  parser.add_argument("--probe_steps", type=int, default=300)
  parser.add_argument("--only", default="supervised,mae,probe_pretrained,probe_random")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "audio-transfer"))
  parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "audio-transfer.json"))
  args = parser.parse_args()
  only = args.only.split(",")
  result = json.load(open(args.output)) if os.path.exists(args.output) else {}
  mae = os.path.join(args.workdir, "mae")
  probe = [f"--config.steps={args.probe_steps}", "--config.eval.every=100",
           f"--config.checkpoint.every={args.probe_steps}"]
  plans = {
      "supervised": ("supervised", f"--config.steps={args.supervised_steps}"),
      "mae": ("mae", f"--config.steps={args.mae_steps}",
              f"--config.checkpoint.every={args.mae_steps}"),
      "probe_pretrained": ("probe", *probe, f"--config.init_from={mae}"),
      "probe_random": ("probe", *probe),
  }
  for name in only:
    preset, *flags = plans[name]
    result[name] = train(os.path.join(args.workdir, name), preset, *flags)
    import jax  # pylint: disable=g-import-not-at-top
    result["environment"] = {"jax": jax.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "cpus": os.cpu_count()}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)
  for name in plans:
    if name in result:
      r = result[name]
      last = r["eval"][max(r["eval"], key=int)]
      print(f"{name:>16}: last eval {last} ({r['wall_seconds']:.0f} s wall, "
            f"{r['cpu_seconds']:.0f} s CPU, load {r['load_average']})")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
