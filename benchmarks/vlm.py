r"""The image-conditioned LM against a text-only baseline trained the same way, on the drawn scenes.

  PYTHONPATH=. python benchmarks/vlm.py                      # size=tiny, both runs, ~minutes/CPU
  PYTHONPATH=. python benchmarks/vlm.py --steps 300 --out /tmp/vlm.json
  PYTHONPATH=. python benchmarks/vlm.py --siglip runs/bench-siglip   # + a frozen SigLIP tower

Trains configs/vlm.py:size=tiny twice through foundation.train (the same decoder, data, steps,
batch and seed): once with the image prefix, once with model.text_only=True (no image). Then
both answer the held-out scenes' questions and caption them greedily (colour-shape combinations
never trained on; foundation/tasks/vlm.py exact_match: whole answers and captions, and each
caption's four attributes), and the figures go to
benchmarks/results/vlm.json (docs/vlm.md shows them).
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import jax

from configs import vlm as vlm_config
from foundation import generate
from foundation import train as train_lib
from foundation.tasks import vlm as vlm_task


def run(name: str, arg: str, steps: int, root: str, heldout: int, **fields) -> dict:
  config = vlm_config.get_config(arg).unlock()
  for field, value in fields.items():
    config[field] = value
  if steps:
    config.steps = steps
    config.checkpoint.every = steps
  workdir = os.path.join(root, name)
  start = time.time()
  result = train_lib.train(config, workdir)
  train_s = time.time() - start
  session = generate.load(workdir)
  start = time.time()
  figures = vlm_task.exact_match(session.model, session.params, session.tokenizer,
                                 session.config, "heldout", heldout, mesh=session.mesh,
                                 axis_rules=session.axis_rules)
  seen = vlm_task.exact_match(session.model, session.params, session.tokenizer, session.config,
                              "eval", heldout, mesh=session.mesh, axis_rules=session.axis_rules)
  out = {"config": arg, **fields, "steps": int(config.steps), "batch_size": int(config.batch_size),
         "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - start, 1),
         "final_train_loss": float(result["train"].get("loss", float("nan"))),
         "eval_loss": float(result["eval"].get("loss", float("nan"))),
         "eval_token_accuracy": float(result["eval"].get("token_accuracy", float("nan"))),
         "heldout": figures, "eval_split": seen}
  print(name, json.dumps(out, indent=1), flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--steps", type=int, default=0, help="0: the config's")
  parser.add_argument("--heldout", type=int, default=200, help="held-out scenes scored")
  parser.add_argument("--out", default="benchmarks/results/vlm.json")
  parser.add_argument("--keep", default="", help="keep the workdirs under this folder")
  parser.add_argument("--siglip", default="", help="a configs/siglip.py workdir: adds a run whose "
                      "image tower starts from its image/ group, frozen")
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="vlm-bench-")
  try:
    runs = {"vlm": run("vlm", f"size={args.size}", args.steps, root, args.heldout),
            "text_only": run("text_only", f"size={args.size},text_only", args.steps, root,
                             args.heldout)}
    if args.siglip:  # the contrastive run's image tower, frozen: "train once, apply many times"
      runs["vlm_siglip_tower"] = run(
          "vlm_siglip_tower", f"size={args.size}", args.steps, root, args.heldout,
          init_from=f"image={args.siglip}:image",
          init_from_skip="image/map_head/.*", trainable="^(projection|decoder)/")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  record = {"benchmark": "vlm", "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                                          f"{jax.device_count()} {jax.devices()[0].platform} device",
            "command": f"python benchmarks/vlm.py --size {args.size} --steps {args.steps} "
                       f"--heldout {args.heldout}" + (f" --siglip {args.siglip}" if args.siglip
                                                      else ""),
            "siglip_workdir": ("made by `python benchmarks/image_text.py --loss sigmoid`"
                               if args.siglip else ""),
            **runs}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=1)
  for name, result in runs.items():
    h = result["heldout"]
    print(f"{name}: held-out questions {h['qa']:.3f} exact, captions {h['caption']:.3f} exact, "
          f"caption attributes {h['caption/attributes']:.3f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
