"""The ViT family through the generic core: the trainer learns the embedded shapes, a sharded step
equals the one-device step, resume is bit-identical, and bad image configs are one-line errors."""

import functools
import re
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import vit as vit_configs
from foundation import build as build_lib
from foundation import mesh as mesh_lib
from foundation.data import image_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *extra, config="configs/vit.py:size=test"):
  return subprocess.run(
      # The cosine schedule's length fixed, so that a run stopped early by --config.steps resumes
      # on the uninterrupted run's schedule.
      [sys.executable, "-m", "foundation.train", "--config", config, "--workdir", str(workdir),
       "--config.optim.decay_steps=120", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})


def _records(workdir, split):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  return {l["step"]: l for l in lines if l.get("split") == split}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vit") / "run"
  result = _train(workdir)
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir, result.stdout


def test_the_trainer_learns_the_embedded_shapes(uninterrupted):
  workdir, stdout = uninterrupted
  assert "vit model, task image_classify" in stdout
  evals = _records(workdir, "eval")
  first, last = evals[0], evals[max(evals)]
  # 120 steps of the 2-layer test size: the loss falls (configs/vit.py:size=tiny, the demo,
  # reaches >= 90% held-out top-1; docs/vision.md has its figures).
  assert last["loss"] < first["loss"] - 0.05, (first, last)
  train = _records(workdir, "train")
  assert "patches_per_sec" in train[max(train)] and "examples_per_sec" in train[max(train)]


def test_resume_is_bit_identical(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  part = tmp_path / "part"
  assert _train(part, "--config.steps=20").returncode == 0
  resumed = _train(part)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from the checkpoint at step 20" in resumed.stdout
  whole, parts = _records(workdir, "train"), _records(part, "train")
  steps = [s for s in whole if s > 20]
  assert steps and all(parts[s]["loss"] == whole[s]["loss"] for s in steps)
  assert _records(part, "eval")[120] == _records(workdir, "eval")[120]


# ---------------------------------------------------------------- sharding

def make_config(**mesh):
  config = vit_configs.get_config("size=test")
  with config.unlocked():
    config.optim.warmup_steps = 0
    config.optim.eps = 1e-3  # the update follows the gradient (see tests/test_sharding.py)
    config.batch_size = 16
    for axis in mesh_lib.AXES:
      config.mesh[axis] = mesh.get(axis, 1)
  return config


def one_step(config, devices):
  """Init and two train steps (the head starts at zero: the first step moves only the head, the
  second every param); returns (second loss, params before, params after)."""
  built = build_lib.build(config, devices)
  state = built.init_state()
  initial = jax.device_get(state["params"])
  train_step, _ = built.jit_steps()
  batches = image_input.make_train_iterator(config, 0, 1)
  with built.context():
    for _ in range(2):
      state, metrics = train_step(state, built.global_batch(next(batches)))
  return float(metrics["loss"]), initial, jax.device_get(state["params"])


@functools.cache
def reference():
  return one_step(make_config(), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_a_sharded_step_equals_the_one_device_step(mesh):
  ref_loss, initial, ref_params = reference()
  loss, _, params = one_step(make_config(**mesh), jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # The steps moved every param (so equality is not vacuous), but the key bias: adding q . b_k to
  # every score of a query leaves its softmax unchanged, so its gradient is 0.
  moved = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, initial))[0]
  assert all(m > 1e-5 for path, m in moved if "['k']['bias']" not in jax.tree_util.keystr(path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               params, ref_params)


# ---------------------------------------------------------------- what trains, on another family

@pytest.mark.parametrize("fields, trains", [
    # LoRA is a transform of the params: the ViT gets adapters with no field of its own; they and
    # the new head train. In two steps B moves (the zero head moves first); A's gradient is
    # B-weighted, so A waits for a non-zero B.
    (dict(lora=dict(rank=2, targets="attn/(q|v)$")), r"lora_b|^head/"),
    # A linear probe: only the head trains, the encoder stays as it was.
    (dict(trainable="^head/"), r"^head/"),
], ids=["lora", "linear-probe"])
def test_lora_and_a_linear_probe_on_the_vit(fields, trains):
  config = make_config()
  with config.unlocked():
    for key, value in fields.items():
      config[key].update(value) if isinstance(value, dict) else config.update({key: value})
  _, initial, params = one_step(config, jax.devices()[:1])
  changed = {jax.tree_util.keystr(p, simple=True, separator="/"): bool(np.any(a != b))
             for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree.leaves(initial))}
  if "lora" in fields:
    assert {k for k in changed if "lora_" in k} == {
        f"layers/attn/{m}/lora_{ab}" for m in "qv" for ab in "ab"}
  assert {k for k, moved in changed.items() if moved} == {
      k for k in changed if re.search(trains, k)}, changed


def test_mixup_trains_on_soft_labels():
  """data.mixup: the batch gains soft_label (sharded with the batch) and the loss is the
  cross-entropy against it: the step runs, the loss is finite and not the unmixed one."""
  config = make_config()
  with config.unlocked():
    config.data.mixup = 0.4
  loss, _, _ = one_step(config, jax.devices()[:1])
  assert np.isfinite(loss) and abs(loss - reference()[0]) > 1e-4


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("override, message", [
    ("--config.data.image_size=30", "data.image_size=30 (image height 30) is not divisible by "
                                     "model.patch_size=8"),
    ("--config.model.family=vitt", "model.family='vitt' is not a registered family; did you mean "
                                   "'vit'"),
    ("--config.data.pp_train=decode|flip_lrr", "did you mean 'flip_lr'"),
    ("--config.model.num_heads=3", "model.width=32 is not divisible by model.num_heads=3"),
])
def test_bad_image_configs_are_one_line_errors(tmp_path, override, message):
  result = _train(tmp_path / "bad", override)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("config error:") and message in last, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists()


# ---------------------------------------------------------------- fine-tuning from an encoder

def test_fine_tuning_loads_the_encoder_and_a_fresh_head(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  result = _train(tmp_path / "ft", f"--config.init_from={workdir}", "--config.init_from_skip=head/.*",
                  "--config.model.num_classes=5", "--config.data.classes=circle,square,triangle,"
                  "plus,ring", "--config.steps=2", "--config.eval.every=0")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "2 new, initialised: head/bias, head/kernel" in result.stdout  # every other param loaded
  # Without init_from_skip, the head of another shape is a one-line error naming it.
  refused = _train(tmp_path / "bad", f"--config.init_from={workdir}", "--config.model.num_classes=5",
                   "--config.data.classes=circle,square,triangle,plus,ring")
  last = refused.stderr.strip().splitlines()[-1]
  assert refused.returncode == 1 and last.startswith("config error: init_from=")
  assert "head/kernel (32, 10) on disk vs (32, 5) here" in last


def test_evaluate_gives_the_trainers_top1(uninterrupted, tmp_path):
  """`python -m foundation.evaluate --workdir` on a ViT run: its task on its own eval split, the
  same figures as the trainer's last eval."""
  workdir, _ = uninterrupted
  out = tmp_path / "eval.json"
  result = subprocess.run(
      [sys.executable, "-m", "foundation.evaluate", "--workdir", str(workdir), "--output",
       str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stdout + result.stderr
  figures = json.loads(out.read_text())
  trainer = _records(workdir, "eval")[120]
  np.testing.assert_allclose(figures["image_classify/accuracy"], trainer["accuracy"], rtol=1e-6)
  np.testing.assert_allclose(figures["image_classify/loss"], trainer["loss"], rtol=1e-6)
