r"""The contrastive two-tower demo on the drawn scenes, 8 simulated CPU devices:

  PYTHONPATH=. python benchmarks/image_text.py [--loss sigmoid|softmax] [--steps N]
      [--workdir runs/bench-siglip] [--output benchmarks/results/image-text-siglip.json]

1. trains configs/siglip.py:size=tiny (the given loss) with `python -m foundation.train` (a
   finished workdir is reused: the trainer resumes and stops at once);
2. zero-shot accuracy on the held-out colour-shape combinations (never in training; 30 classes,
   chance 1/30) and retrieval recall@1/5 over the eval split (the trainer's own evaluators);
3. linear probes on the image tower's pooled features, trained vs a randomly initialised tower of
   the same shape: ridge regression to one-hot labels of shape (5 classes), count (3) and colour
   (6), fit on 2,000 train scenes, scored on the 1,000 eval scenes.
Writes the figures, the commands and the times to --output (JSON).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, ROOT)

PROBE_TRAIN = 2000


def train(args) -> float:
  command = [sys.executable, "-m", "foundation.train", "--config",
             f"configs/siglip.py:size=tiny,loss={args.loss}", "--workdir", args.workdir]
  if args.steps:
    command += [f"--config.steps={args.steps}"]
  start = time.time()
  print(" ".join(command[1:]), flush=True)
  result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  if result.returncode:
    raise SystemExit(f"training failed with exit code {result.returncode}")
  return time.time() - start, command


def ridge_probe(train_x, train_y, test_x, test_y, classes: int, l2: float = 1e-2) -> float:
  """Top-1 of a ridge regression to one-hot labels on standardised features (with a bias)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  a = np.concatenate([(train_x - mean) / std, np.ones((len(train_x), 1))], 1)
  b = np.concatenate([(test_x - mean) / std, np.ones((len(test_x), 1))], 1)
  target = np.eye(classes)[train_y]
  weights = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]), a.T @ target)
  return float(np.mean(np.argmax(b @ weights, 1) == test_y))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--loss", default="sigmoid", choices=("sigmoid", "softmax"))
  parser.add_argument("--steps", type=int, default=0, help="0: the config's (1,000)")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  name = "siglip" if args.loss == "sigmoid" else "clip"
  args.workdir = args.workdir or os.path.join(ROOT, "runs", f"bench-{name}")
  args.output = args.output or os.path.join(ROOT, "benchmarks", "results",
                                            f"image-text-{name}.json")
  seconds, command = train(args)

  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from foundation import build as build_lib  # pylint: disable=g-import-not-at-top
  from foundation import checkpoint  # pylint: disable=g-import-not-at-top
  from foundation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from foundation import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from foundation.data import scenes  # pylint: disable=g-import-not-at-top
  from foundation.tasks import contrastive  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(workdir_lib.resolve(workdir_lib.read(args.workdir),
                                                         args.workdir))
  built = build_lib.build(config)
  random_params = built.init_state()["params"]
  params, _ = checkpoint.load_params(args.workdir, built.abstract_state["params"])
  runtime = evaluate_lib.Runtime(built.model, built.mesh, built.rules, None)
  start = time.time()
  figures = {}
  for evaluator in (contrastive.ZeroShot(config, runtime), contrastive.Retrieval(config, runtime)):
    figures.update(evaluator.run(params))
    figures.update({f"random_tower/{k}": v for k, v in evaluator.run(random_params)
                    if k.endswith("accuracy") or "recall@1" in k})

  # Linear probes on the image tower's pooled features.
  embedder = contrastive.Embedder(config, runtime)
  model = built.model
  features = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                              method=lambda m, images: m.image(images)))
  embedder._image = features  # pylint: disable=protected-access
  size = int(config.data.image_size)
  train_set = scenes.load("train", 0, int(config.data.num_train), size)
  eval_set = scenes.load("eval", 0, int(config.data.num_eval), size)
  train_px = contrastive._eval_images(config, np.asarray(train_set.images[:PROBE_TRAIN]))  # pylint: disable=protected-access
  eval_px = contrastive._eval_images(config, np.asarray(eval_set.images))  # pylint: disable=protected-access
  for which, p in (("trained", params), ("random", random_params)):
    tx, ex = embedder.images(p, train_px), embedder.images(p, eval_px)
    for attribute, classes in (("shape", len(scenes.SHAPES)), ("count", 3),
                               ("colour", len(scenes.COLOUR_NAMES))):
      labels = {"count": lambda s: np.asarray(s.count) - 1}.get(
          attribute, lambda s: np.asarray(getattr(s, attribute)))
      figures[f"probe/{which}/{attribute}"] = ridge_probe(
          tx, labels(train_set)[:PROBE_TRAIN], ex, labels(eval_set), classes)
  del nn
  metrics = [json.loads(l) for l in open(os.path.join(args.workdir, "metrics.jsonl")) if l.strip()]
  evals = {m["step"]: {k: v for k, v in m.items() if k not in ("split", "step", "time")}
           for m in metrics if m.get("split") == "eval"}
  tasks = {m["step"]: {k: v for k, v in m.items() if k not in ("split", "step", "time")}
           for m in metrics if m.get("split") == "tasks"}
  result = {"command": " ".join(["python"] + command[1:]), "train_seconds": round(seconds, 1),
            "evaluate_seconds": round(time.time() - start, 1), "steps": int(config.steps),
            "batch_size": int(config.batch_size), "devices": jax.device_count(),
            "figures": figures, "eval_curve": evals, "tasks_curve": tasks}
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(figures, indent=2))


if __name__ == "__main__":
  main()
