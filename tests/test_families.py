"""Adding a family needs no edit of the core: a toy model family, its task and its input are
registered by a config file written here, and trained through `python -m foundation.train`."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A whole family in one config file: y = x . w regression on numbers the input makes from the
# seed. The trainer loads the config file first, so the registrations happen before it looks.
TOY_CONFIG = r'''
import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from configs import common
from foundation import registry
from foundation.tasks import base

FEATURES = 8
TRUE_W = np.linspace(-1.0, 1.0, FEATURES).astype(np.float32)


class Linear(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                   (self.features,))
    return x @ w


@registry.register("family", "toy_linear")
class ToyFamily:
  POSITIVE = ("model.features",)
  SPLIT_SIZES = {"embed": "model.features"}

  @staticmethod
  def check(config):
    pass

  @staticmethod
  def make_model(config):
    return Linear(config.model.features)


@registry.register("task", "toy_regression")
class ToyRegression(base.Task):
  input = "toy_numbers"

  def batch_spec(self):
    return {"x": base.Field((FEATURES,), "float32", ("batch", None)),
            "y": base.Field((), "float32", ("batch",))}

  def model_args(self, batch):
    return (batch["x"],)

  def loss_sums(self, model, params, batch, rngs=None):
    error = model.apply({"params": params}, batch["x"]) - batch["y"]
    return {"loss_sum": jnp.sum(error * error)}

  def count(self, batch):
    return jnp.float32(batch["y"].shape[0])

  def count_unclamped(self, batch):
    return jnp.float32(batch["y"].shape[0])

  def flops_per_example(self, model):
    return 6.0 * FEATURES


def numbers(seed, index, rows):
  x = np.random.default_rng([seed, index]).standard_normal((rows, FEATURES)).astype(np.float32)
  return {"x": x, "y": x @ TRUE_W}


class Numbers:
  """Batch k of host p: rows of numbers fixed by (seed, k, p); the position is k."""

  def __init__(self, config, index, count):
    self.seed, self.index, self.count = config.seed, index, count
    self.rows, self.position = config.batch_size // count, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.position += 1
    return numbers(self.seed, self.position * 1000 + self.index, self.rows)

  def save(self, directory):
    with open(os.path.join(directory, f"toy_{self.index}.json"), "w") as f:
      json.dump({"position": self.position}, f)

  def restore(self, directory):
    with open(os.path.join(directory, f"toy_{self.index}.json")) as f:
      self.position = json.load(f)["position"]

  def description(self):
    return {"sources": [["toy_numbers", 1.0]], "position_kind": "toy",
            "process_count": self.count}

  def metrics(self):
    return {}


@registry.register("input", "toy_numbers")
def toy_input(config, index, count, with_eval):
  evals = [numbers(config.seed + 1, i, config.batch_size // count) for i in range(2)]
  return Numbers(config, index, count), evals if with_eval else []


def get_config(arg=None):
  config = common.run_config(steps=30, batch_size=16, lr=0.1)
  config.task = "toy_regression"
  config.model = ml_collections.ConfigDict(dict(family="toy_linear", features=FEATURES))
  config.optim.warmup_steps = 1
  config.optim.weight_decay = 0.0
  config.optim.decay_steps = 30  # fixed, so that a run stopped at 10 by --config.steps resumes on it
  config.checkpoint.every = 10
  config.eval.every = 10
  config.eval.steps = 2
  config.log.every = 5
  return config.lock()
'''


def _train(config_path, workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "foundation.train", "--config", str(config_path), "--workdir",
       str(workdir), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": ROOT})


@pytest.fixture(scope="module")
def toy_config(tmp_path_factory):
  path = tmp_path_factory.mktemp("toy") / "toy.py"
  path.write_text(TOY_CONFIG)
  return path


def _losses(workdir, split):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {l["step"]: l["loss"] for l in lines if l.get("split") == split}


def test_a_family_registered_in_a_config_file_trains_and_resumes(toy_config, tmp_path):
  run = tmp_path / "toy"
  result = _train(toy_config, run)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "toy_linear model, task toy_regression" in result.stdout
  evals = _losses(run, "eval")
  assert evals[0] > 1.0 and evals[30] < 0.05 * evals[0], evals  # it learned y = x . w
  assert sorted(os.listdir(run / "checkpoints")) == ["10", "20", "30"]

  # Resume: stop at 10, continue to 30; the losses after step 10 are the uninterrupted run's.
  part = tmp_path / "part"
  assert _train(toy_config, part, "--config.steps=10").returncode == 0
  resumed = _train(toy_config, part)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from the checkpoint at step 10" in resumed.stdout
  assert _losses(part, "train")[30] == _losses(run, "train")[30]
  assert _losses(part, "eval")[30] == evals[30]


def test_an_unknown_family_or_task_is_one_line_with_a_suggestion(toy_config, tmp_path):
  result = _train(toy_config, tmp_path / "a", "--config.model.family=toy_linaer")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("config error: model.family=")
  assert "did you mean 'toy_linear'" in result.stderr and "Traceback" not in result.stderr
  result = _train(toy_config, tmp_path / "b", "--config.task=toy_regresion")
  assert "config error: task='toy_regresion' is not a registered task; did you mean " \
         "'toy_regression'" in result.stderr
