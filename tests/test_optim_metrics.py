"""The learning-rate schedule, the weight-decay mask, and what the reporter writes."""

import glob
import json
import math

import jax
import numpy as np
import pytest

from configs import lm
from foundation import metrics as metrics_lib
from foundation import optim
from foundation import step as step_lib


def schedule_config(**optim_changes):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.steps = 100
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 10
    config.optim.min_lr_ratio = 0.1
    for key, value in optim_changes.items():
      config.optim[key] = value
  return config


def test_warmup_then_cosine_to_the_floor():
  schedule = optim.learning_rate_schedule(schedule_config())
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  # Half-way through the cosine: the mean of peak and floor.
  np.testing.assert_allclose(float(schedule(55)), (1e-3 + 1e-4) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(500)), 1e-4, rtol=1e-6)  # stays on the floor


def abstract_params(config):
  boxed = jax.eval_shape(lambda: step_lib.make_model(config).init(
      jax.random.key(0), *step_lib._dummy_inputs(config))["params"])
  from flax import linen as nn
  return nn.unbox(boxed)


@pytest.mark.parametrize("decay_norms,decay_embeddings", [(False, False), (True, True)])
def test_weight_decay_mask_follows_the_config(decay_norms, decay_embeddings):
  config = schedule_config(decay_norms=decay_norms, decay_embeddings=decay_embeddings)
  mask = optim.weight_decay_mask(abstract_params(config), config)
  assert mask["embed"]["embedding"] is decay_embeddings
  assert mask["final_norm"]["scale"] is decay_norms
  assert mask["layers"]["attn_norm"]["scale"] is decay_norms
  assert mask["layers"]["attn"]["q"]["kernel"] is True
  assert mask["output"]["kernel"] is True


def test_weight_decay_leaves_masked_params_alone():
  # With lr > 0 and zero gradients, only decayed params move: by lr * weight_decay * param.
  config = schedule_config(warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
  params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), abstract_params(config))
  optimizer = optim.make_optimizer(config)
  grads = jax.tree.map(np.zeros_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  assert float(np.abs(updates["final_norm"]["scale"]).max()) == 0.0
  assert float(np.abs(updates["embed"]["embedding"]).max()) == 0.0
  np.testing.assert_allclose(updates["layers"]["mlp"]["wo"]["kernel"], -1e-3 * 0.5, rtol=1e-6)


def test_peak_flops_lookup():
  assert metrics_lib.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics_lib.peak_flops_per_device("TPU v5p chip") == 459e12
  assert metrics_lib.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics_lib.peak_flops_per_device("cpu") is None
  assert metrics_lib.peak_flops_per_device("cpu", override_tflops=2.0) == 2e12


def test_throughput_and_mfu():
  # 4 rows of 250 tokens a step
  throughput = metrics_lib.Throughput(examples_per_step=4, flops_per_step=4e12,
                                      peak_flops_total=8e12, unit="tokens", units_per_example=250)
  throughput.t0 -= 2.0  # pretend two seconds passed over 4 steps
  report = throughput.report(4)
  np.testing.assert_allclose(report["step_time"], 0.5, rtol=1e-2)
  np.testing.assert_allclose(report["examples_per_sec"], 8, rtol=1e-2)
  np.testing.assert_allclose(report["tokens_per_sec"], 2000, rtol=1e-2)
  np.testing.assert_allclose(report["mfu"], 4e12 / 0.5 / 8e12, rtol=1e-2)


def test_reporter_writes_tensorboard_events_and_jsonl(tmp_path):
  reporter = metrics_lib.Reporter(str(tmp_path), total_steps=10)
  reporter.write(5, {"loss": 2.5, "lr": 1e-3})
  reporter.write(5, {"loss": 2.75, "perplexity": math.exp(2.75)}, prefix="eval")
  reporter.write_text(10, "sample", "def f():")
  reporter.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"step": 5, "split": "train", "loss": 2.5, "lr": 1e-3}
  assert lines[1]["split"] == "eval" and lines[1]["loss"] == 2.75

  import tensorflow as tf  # reads the event file the way TensorBoard does
  scalars = {}
  for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars[value.tag] = (event.step, value.simple_value)
  assert scalars["train/loss"] == (5, 2.5)
  assert scalars["eval/loss"] == (5, 2.75)
  np.testing.assert_allclose(scalars["train/lr"][1], 1e-3, rtol=1e-6)


def test_no_rates_before_a_timed_step():
  # The first step compiles; the trainer starts the clock after it, so no rate exists at it.
  throughput = metrics_lib.Throughput(examples_per_step=4, flops_per_step=4e12,
                                      peak_flops_total=8e12)
  throughput.start(1)
  assert throughput.report(1) == {}
  throughput.t0 -= 1.0
  assert throughput.report(3)["step_time"] == pytest.approx(0.5, rel=1e-2)
