r"""Pre-trains a language model: one straight loop, readable top to bottom.

  python -m foundation.train --config configs/lm.py:size=tiny --workdir runs/tiny \
      [--config.steps=500 --config.mesh.fsdp=-1 ...]

Starting again with the same --workdir resumes from its latest complete checkpoint.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported by the input

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from foundation import checkpoint
from foundation import config as config_lib
from foundation import data
from foundation import generate
from foundation import mesh as mesh_lib
from foundation import metrics as metrics_lib
from foundation import optim
from foundation import step as step_lib
from foundation.models import transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and metrics.")


def evaluate(eval_step, params, eval_batches, batch_sharding) -> dict:
  """Held-out loss and perplexity over the fixed eval batches (sums first: exact over hosts)."""
  loss_sum, tokens = 0.0, 0.0
  for local_batch in eval_batches:
    out = jax.device_get(eval_step(params, mesh_lib.make_global_batch(local_batch, batch_sharding)))
    loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
  loss = loss_sum / max(tokens, 1.0)
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the run in `workdir`; returns the last train and eval metrics."""
  # ------------------------------------------------------------------ Devices and checks
  mesh_lib.initialize_distributed()
  config_lib.validate(config, jax.devices(), jax.process_count())
  try:
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    data.check_vocab_size(tokenizer, config)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  reporter = metrics_lib.Reporter(workdir, config.steps)
  reporter.print(f"foundation: {config.size} model, {jax.device_count()} {jax.devices()[0].platform}"
                 f" devices, workdir {workdir}")

  # ------------------------------------------------------------------ Mesh
  mesh = mesh_lib.make_mesh(config.mesh)
  reporter.print(mesh_lib.describe(mesh, config.mesh))
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.rules(config))

  # ------------------------------------------------------------------ Model, optimizer, shardings
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  abstract_state, state_shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  n_params = transformer.count_params(abstract_state["params"])
  flops_per_step = transformer.flops_per_token(model.cfg, config.seq_len) * (
      config.batch_size * config.seq_len)
  reporter.print(f"model: {n_params:,} params, {flops_per_step / 1e12:.3g} TFLOP per step "
                 f"(PaLM formula), batch {config.batch_size} x {config.seq_len} tokens")

  # ------------------------------------------------------------------ Input
  try:  # a bad source, glob, feature, mixture or tokenizer is a config error, not a traceback
    train_iter = data.make_train_iterator(config, jax.process_index(), jax.process_count())
    eval_batches = (data.make_eval_batches(config, jax.process_index(), jax.process_count())
                    if config.eval.every > 0 else [])
    # The SentencePiece model is kept as WORKDIR/tokenizer.model, fixed once checkpoints exist.
    data.store_tokenizer(tokenizer, config.data.tokenizer, workdir, jax.process_index() == 0)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  reporter.print(data.summary(train_iter))

  # ------------------------------------------------------------------ Checkpoint: resume or init
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.write_config(workdir, config)
  latest = manager.latest_step()
  if latest is None:
    state = step_lib.init_state(model, optimizer, config, mesh, state_shardings)
    reporter.print("started from scratch (no checkpoint in the workdir)")
  else:
    try:  # another tokenizer, vocab, seq_len, data or (on-the-fly) host count: refuse, clearly
      data.check_resume(checkpoint.read_meta(manager, latest).get("data"),
                        train_iter.description(), latest)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
    state = checkpoint.restore(manager, latest, abstract_state, train_iter)
    reporter.print(f"resumed from the checkpoint at step {latest}")
  first_step = int(jax.device_get(state["step"]))

  # ------------------------------------------------------------------ Steps
  train_step, eval_step = step_lib.jit_steps(model, optimizer, config, mesh, state_shardings)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.log.peak_tflops)
  throughput = metrics_lib.Throughput(config.batch_size * config.seq_len, flops_per_step,
                                      peak * jax.device_count() if peak else None)

  # ------------------------------------------------------------------ Loop
  train_metrics, eval_metrics = {}, {}
  with step_lib.sharding_context(config, mesh):
    if eval_batches and first_step == 0:
      eval_metrics = evaluate(eval_step, state["params"], eval_batches, batch_sharding)
      reporter.write(0, eval_metrics, prefix="eval")
    for step in range(first_step + 1, config.steps + 1):
      batch = mesh_lib.make_global_batch(next(train_iter), batch_sharding)
      state, device_metrics = train_step(state, batch)
      if step == first_step + 1:
        jax.block_until_ready(state)  # the first step compiles: time the rest only
        throughput.start(step)
      is_last = step == config.steps
      if step % config.log.every == 0 or is_last:
        # Realised mixture shares ('data/<source>') are logged with the loss.
        train_metrics = {**jax.device_get(device_metrics), **throughput.report(step),
                         **train_iter.metrics()}
        reporter.write(step, train_metrics)
      if config.eval.every > 0 and (step % config.eval.every == 0 or is_last):
        eval_metrics = evaluate(eval_step, state["params"], eval_batches, batch_sharding)
        reporter.write(step, eval_metrics, prefix="eval")
      if step % config.checkpoint.every == 0 or is_last:
        checkpoint.save(manager, step, state, train_iter)
    manager.wait_until_finished()

    # ---------------------------------------------------------------- A sample
    if config.log.generate_tokens > 0:
      text = generate.greedy_continuation(model, state["params"], tokenizer, config.log.prompt,
                                          config.log.generate_tokens, config.seq_len)
      reporter.print(f"--- greedy continuation of {config.log.prompt!r}:\n"
                     f"{config.log.prompt}{text}\n---")
      reporter.write_text(config.steps, "sample", config.log.prompt + text)
  reporter.close()
  manager.close()
  return {"train": train_metrics, "eval": eval_metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required, e.g. "
                         "--config configs/lm.py:size=tiny --workdir runs/tiny")
  logging.set_verbosity(logging.WARNING)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
