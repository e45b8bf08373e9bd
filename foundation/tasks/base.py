"""What every task provides to the generic core (step.py, train.py, build.py).

A task is built from the run config: `task = registry.get("task", config.task)(config)`. It says

  * what a batch holds: `batch_spec()` -> {key: Field(shape after the batch dim, dtype, logical
    axes)}; the batch's shardings, the dummy batch for init and the benchmarks' synthetic batches
    all come from it;
  * how to call its model on a batch for init (`model_args`);
  * its loss as sums (`loss_sums`), what is differentiated (`objective`), what the sums are divided
    by (`count`: tokens or rows) and the metrics of train and eval steps. Sums, never means, so that
    micro-batches, chunks and hosts add up exactly: the division happens once;
  * its input (`input`: a registry name) and FLOPs per example (MFU), and what an example is made
    of for throughput (`unit`, `units_per_example`: tokens, patches).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
  """One key of a batch: its shape after the batch dimension, dtype and logical axis names."""
  shape: tuple[int, ...]
  dtype: str
  axes: tuple[str, ...]  # 'batch' first, then one name per dimension of `shape`
  fill: int = 0          # the value of the dummy batch (init never depends on it)


class Task:
  """The base every task extends; the methods that raise must be given."""
  input = ""             # the registry 'input' that makes its batches
  unit = "examples"      # what throughput counts besides examples ('tokens', 'patches')
  generates = False      # whether the trained model can continue a prompt (the end-of-run sample)

  def __init__(self, config):
    self.config = config

  # ---------------------------------------------------------------- checks
  def check(self, config) -> None:
    """Field checks that need no devices; ValueError naming the field (config.ConfigError)."""

  def split_sizes(self, config) -> dict[str, str]:
    """Logical axis -> the config field whose size it splits (mesh divisibility checks)."""
    return {}

  def tokenizer(self, check_vocab: bool = True):
    """The tokenizer of a text task (checked against the model's vocabulary unless told not
    to), else None."""
    return None

  # ---------------------------------------------------------------- batches
  def batch_spec(self) -> dict[str, Field]:
    raise NotImplementedError

  def dummy_batch(self, batch_size: int = 1) -> dict:
    return {k: jnp.full((batch_size, *f.shape), f.fill, f.dtype)
            for k, f in self.batch_spec().items()}

  def model_args(self, batch: dict) -> tuple:
    """The positional arguments of the model's __call__ for this batch (init and apply)."""
    raise NotImplementedError

  # ---------------------------------------------------------------- loss and metrics
  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    """float32 scalar sums over the batch; 'loss_sum' is the reported loss's numerator."""
    raise NotImplementedError

  def objective(self, sums: dict):
    """The numerator of what is differentiated (default: the loss itself)."""
    return sums["loss_sum"]

  def count(self, batch: dict):
    """What the sums are divided by (a float32 scalar, at least 1): tokens or rows."""
    raise NotImplementedError

  def train_metrics(self, sums: dict, count) -> dict:
    return {"loss": sums["loss_sum"] / count}

  def eval_sums(self, model, params, batch) -> dict:
    """Sums of one eval batch, with 'count'; hosts and batches add them up."""
    sums = self.loss_sums(model, params, batch)
    return {"loss_sum": sums["loss_sum"], "count": self.count_unclamped(batch)}

  def count_unclamped(self, batch: dict):
    raise NotImplementedError

  def eval_metrics(self, sums: dict) -> dict:
    """Metrics from the summed eval sums (plain floats)."""
    return {"loss": sums.get("loss_sum", 0.0) / max(sums.get("count", 0.0), 1.0)}

  # ---------------------------------------------------------------- cost
  def flops_per_example(self, model) -> float:
    raise NotImplementedError

  def units_per_example(self) -> int:
    return 1

  def synthetic_batch(self, seed: int, index: int, batch_size: int) -> dict:
    """A random host batch of the spec's shapes (benchmarks and compile checks)."""
    rng = np.random.default_rng([seed, index])
    out = {}
    for k, f in self.batch_spec().items():
      shape = (batch_size, *f.shape)
      out[k] = (rng.standard_normal(shape).astype(f.dtype) if np.dtype(f.dtype).kind == "f"
                else np.full(shape, f.fill, f.dtype))
    return out


class PerRow:
  """What the classification tasks share (a label per row; rows with label_mask 0 are padding):
  the count of real rows, and eval loss and accuracy from 'loss_sum' and 'correct' sums."""

  def count(self, batch: dict):
    return jnp.maximum(batch["label_mask"].sum().astype(jnp.float32), 1.0)

  def count_unclamped(self, batch: dict):
    return (batch["label_mask"] > 0).sum().astype(jnp.float32)

  def eval_sums(self, model, params, batch) -> dict:
    return {**self.loss_sums(model, params, batch), "count": self.count_unclamped(batch)}

  def eval_metrics(self, sums: dict) -> dict:
    count = max(sums.get("count", 0.0), 1.0)
    return {"loss": sums.get("loss_sum", 0.0) / count,
            "accuracy": sums.get("correct", 0.0) / count}
