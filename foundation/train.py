r"""Pre-trains a language model: one straight loop, readable top to bottom.

  python -m foundation.train --config configs/lm.py:size=tiny --workdir runs/tiny \
      [--config.steps=500 --config.mesh.fsdp=-1 ...]

Starting again with the same --workdir resumes from its latest complete checkpoint.
Exit codes: 0 done; 75 preempted (SIGTERM / Ctrl-C: the step was saved, run the same command again
to resume); 3 stopped on bad numbers (guard.nonfinite=stop or too many skipped steps in a row);
74 a checkpoint could not be written (named in one line; the last good one is kept); 1 a config
or input error, named in one line. docs/reliability.md has the details.
"""

import os
import sys
import time

STARTED = time.time()  # the process's start, before the heavy imports: goodput counts from here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported by the input

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from foundation import build as build_lib
from foundation import checkpoint
from foundation import config as config_lib
from foundation import data
from foundation import evaluate as evaluate_lib
from foundation import finetune
from foundation import generate
from foundation import lora
from foundation import mesh as mesh_lib
from foundation import metrics as metrics_lib
from foundation import preemption as preemption_lib
from foundation import registry
from foundation import step as step_lib
from foundation import watch as watch_lib
from foundation import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and metrics.")


def make_input(config, task):
  """(train iterator, eval batches) from the input the task names (registry 'input')."""
  make = registry.get("input", task.input, field=f"task {config.task!r}'s input")
  return make(config, jax.process_index(), jax.process_count(), config.eval.every > 0)


def run_evaluations(evaluations, step: int, is_last: bool, params, config, reporter) -> dict:
  """Runs the evaluations due at `step` (every one at step 0: the baseline) on the state's
  `params` and writes their figures; returns the held-out ones (eval/*) when they ran."""
  due = [e for e in evaluations if e.due(step, is_last)]
  if not due:
    return {}
  params = lora.model_params(params, config)  # the model's own (LoRA: adapters merged)
  held_out = {}
  for group in due:
    figures = evaluate_lib.run(group.evaluators, params)
    reporter.write(step, figures, prefix=group.prefix)
    held_out = figures if group.prefix == "eval" else held_out
  return held_out


EXIT_BAD_NUMBERS = 3


class RunStopped(Exception):
  """The run stopped itself (bad numbers); the message says at which step and what to do."""


def start_state(config, workdir, manager, built, train_iter, say):
  """The state to train from: the workdir's newest readable checkpoint (with the input position),
  else `init_from`'s params with a fresh optimizer, else a fresh init from `config.seed`."""

  def check_data(step, meta):  # another tokenizer, vocab, seq_len, data or host count: refuse
    data.check_resume(meta.get("data"), train_iter.description(), step)

  state, step, meta = checkpoint.restore_latest(manager, built.abstract_state, train_iter, say,
                                                check_data)
  if state is not None:
    saved_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("time", 0)))
    say(f"resumed from the checkpoint at step {step} (saved {saved_at}); the steps after it are "
        f"run again")
    return state
  if config.resume == "required":
    raise config_lib.ConfigError(
        f"resume=required but {manager.directory} holds no complete checkpoint: check --workdir, "
        f"or use --config.resume=auto to start from scratch")
  state = built.init_state()
  if not config.init_from:
    say("started from scratch (no checkpoint in the workdir)")
    return state
  skip = config_lib.init_from_skip(config)  # params to initialise afresh (a new head)
  params = state["params"]
  # One workdir for the whole tree, or PREFIX=WORKDIR[:GROUP] pairs each filling one group of
  # params (a vlm's image/ from a ViT run, or a two-tower run's image/ group, and decoder/ from
  # an LM run); what none fills stays fresh.
  for prefix, source, group in config_lib.init_from_sources(config,
                                                             built.abstract_state["params"]):
    where = prefix + "/" if prefix else ""
    loaded, note = checkpoint.load_params(
        source, _subtree(built.abstract_state["params"], prefix), config.init_from_partial,
        expected=lambda key, where=where: finetune.expected_difference(where + key, config),
        skip=lambda key, where=where: any(pattern.match(where + key) for pattern in skip),
        group=group)
    fresh = _subtree(params, prefix)
    loaded = jax.tree.map(lambda new, old: old if new is None else new, loaded, fresh,
                          is_leaf=lambda x: x is None)
    params = _with_subtree(params, prefix, loaded)
    say(f"started {where + ' ' if where else ''}from the params of {note}, with a fresh optimizer")
  return {**state, "params": params}  # a fresh optimizer state is zeros: init_state's is


def _subtree(tree: dict, prefix: str):
  """The group of a nested params dict at 'a/b' ('' : the whole tree)."""
  for key in filter(None, prefix.split("/")):
    tree = tree[key]
  return tree


def _with_subtree(tree: dict, prefix: str, value) -> dict:
  """A copy of `tree` with the group at `prefix` replaced by `value`."""
  keys = [k for k in prefix.split("/") if k]
  if not keys:
    return value
  return {**tree, keys[0]: _with_subtree(tree[keys[0]], "/".join(keys[1:]), value)}


def check_guard(step: int, metrics: dict, config, manager, say) -> None:
  """Says so when the train step refused an update; stops the run when the config asks to."""
  if not metrics["skipped_in_a_row"]:
    return
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not np.isfinite(loss) or not np.isfinite(grad_norm):
    why = "non-finite loss or gradients"
  elif metrics.get("nonfinite_update"):
    why = "the update's result (new params or optimizer state) is not finite"
  else:
    why = (f"loss spike (loss {loss:.4g} > guard.loss_spike={config.guard.loss_spike} x the "
           f"recent mean)")
  say(f"step {step}: {why} (loss {loss:.4g}, grad norm {grad_norm:.4g}): update skipped, params "
      f"and optimizer state unchanged ({int(metrics['skipped_in_a_row'])} in a row, "
      f"{int(metrics['skipped'])} in all)")
  in_a_row = int(metrics["skipped_in_a_row"])
  if config.guard.nonfinite == "stop" or in_a_row >= config.guard.max_skips_in_a_row:
    checkpoint.wait_for_saves(manager)
    last = manager.latest_step()
    where = (f"the last checkpoint is step {last}: {manager.directory / str(last)}"
             if last is not None else "there is no checkpoint yet")
    reason = ("guard.nonfinite=stop" if config.guard.nonfinite == "stop" else
              f"{in_a_row} skipped steps in a row (guard.max_skips_in_a_row)")
    raise RunStopped(f"stopped at step {step} ({reason}); {where}. Lower optim.lr or look at "
                     f"the data near this step, then start again")


def train(config, workdir: str, started: float | None = None) -> dict:
  """Runs (or resumes) the run in `workdir`; returns the last train and eval metrics and the
  goodput record. `started`: the time.time() that goodput counts from (default: now)."""
  # ------------------------------------------------------------------ Devices and checks
  mesh_lib.initialize_distributed()
  config_lib.validate(config, jax.devices(), jax.process_count())
  try:
    checkpoint.check_workdir(workdir)  # a file, or not writable: say so before any compile
    if "tokenizer" in config.get("data", {}):
      # A tokenizer named relative to the workdir, or moved away since: the workdir's own copy.
      config.data.tokenizer = workdir_lib.resolve_tokenizer(config.data.tokenizer, workdir)
    # The task's tokenizer (text tasks; None for others), checked against the vocabulary.
    tokenizer = step_lib.make_task(config).tokenizer()
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  reporter = metrics_lib.Reporter(workdir, config.steps)
  reporter.print(f"foundation: {config.get('size', '?')} {config.model.get('family', 'decoder')} "
                 f"model, task {config.get('task', 'lm')}, {jax.device_count()} "
                 f"{jax.devices()[0].platform} devices, workdir {workdir}")
  # Goodput's clock, the step time split, memory, the profiler window (config.profile), W&B.
  watch = watch_lib.Watch(config, workdir, reporter, started)

  # ------------------------------------------------------------------ Mesh, model, task, optimizer
  built = build_lib.build(config)
  mesh, model = built.mesh, built.model
  abstract_state = built.abstract_state
  reporter.print(mesh_lib.describe(mesh, config.mesh))
  n_params = finetune.count_params(abstract_state["params"])
  if finetune.has_frozen_params(config):  # what trains, and the optimizer memory it saves
    reporter.print(finetune.describe(finetune.trainable_report(
        abstract_state["params"], finetune.trainable_mask(abstract_state["params"], config))))
  flops_per_step = built.flops_per_step()
  units = built.task.units_per_example()
  reporter.print(f"model: {n_params:,} params, {flops_per_step / 1e12:.3g} TFLOP per step, "
                 f"batch {config.batch_size}" + (f" x {units} {built.task.unit}"
                                                 if built.task.unit != "examples" else ""))

  # ------------------------------------------------------------------ Input
  try:  # a bad source, glob, feature, mixture or tokenizer is a config error, not a traceback
    train_iter, eval_batches = make_input(config, built.task)
    # The tokenizer's files (and a classifier's labels) are kept in the workdir, fixed once
    # checkpoints exist: checked here, written once the run has started (a refused start writes
    # nothing).
    if tokenizer is not None:
      data.store_tokenizer(tokenizer, config.data.tokenizer, workdir, write=False)
    finetune.store_labels(config, train_iter, workdir, False, lambda line: None)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  reporter.print(data.summary(train_iter))
  # The evaluations, built once: the held-out figures (eval.*) and the task evaluators
  # (perplexity, multiple choice, generation; config.evaluate), each on its own schedule.
  try:
    evaluations = evaluate_lib.trainer_schedule(config, model, mesh, tokenizer, eval_batches)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(str(e)) from None

  # ------------------------------------------------------------------ Checkpoint: resume or start
  try:  # a workdir written by another config is refused, naming the fields
    checkpoint.check_same_run(workdir, config, reporter.print)
    leftovers = checkpoint.incomplete_saves(workdir)  # the manager deletes them as it starts
    manager = checkpoint.make_manager(workdir, config)
    if leftovers:
      reporter.print(f"deleted {len(leftovers)} incomplete checkpoint save(s) that a kill left "
                     f"behind: {', '.join(leftovers)}")
    state = start_state(config, workdir, manager, built, train_iter, reporter.print)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  # Every check passed and the state is ready: only now is anything written to the workdir.
  first_step = int(jax.device_get(state["step"]))
  if tokenizer is not None:  # before config.json, which names the workdir's copy (relative)
    data.store_tokenizer(tokenizer, config.data.tokenizer, workdir, jax.process_index() == 0)
  checkpoint.write_config(workdir, config)
  finetune.store_labels(config, train_iter, workdir, jax.process_index() == 0, reporter.print)
  reporter.mark_start(first_step, resumed=first_step > 0)

  # ------------------------------------------------------------------ Steps
  train_step, _ = built.jit_steps()
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.log.peak_tflops)
  throughput = metrics_lib.Throughput(config.batch_size, flops_per_step,
                                      peak * jax.device_count() if peak else None,
                                      unit=built.task.unit, units_per_example=units)

  # ------------------------------------------------------------------ Loop
  train_metrics, eval_metrics, preempted_at = {}, {}, None
  guard_keys = ("loss", "grad_norm", "skipped", "skipped_in_a_row", "nonfinite_update")

  with built.context(), preemption_lib.Preemption() as preemption:
    if first_step == 0:
      with watch.timing("evaluation"):
        eval_metrics = run_evaluations(evaluations, 0, False, state["params"], config, reporter)
    previous = None  # (step, metrics) of the step before, read once the next one is queued
    try:
      for step in range(first_step + 1, config.steps + 1):
        watch.begin_step(step)  # compile, useful or redone; the profiler window opens
        with watch.timing("data_wait"):
          batch = built.global_batch(next(train_iter))
        state, device_metrics = train_step(state, batch)
        watch.end_step(step, state)  # the profiler window closes after its last step
        if step == first_step + 1:
          jax.block_until_ready(state)  # the first step compiles: time the rest only
          throughput.start(step)
        checkpoint.check_saves(manager)  # a failed async save stops the run now, not later
        if previous:  # one step late, so the device never waits for this host
          check_guard(previous[0], jax.device_get(previous[1]), config, manager, reporter.print)
        previous = (step, {k: device_metrics[k] for k in guard_keys})
        is_last = step == config.steps
        if step % config.log.every == 0 or is_last:
          # A mixture's realised shares ('data/<source>') are logged with the loss.
          shares = train_iter.metrics()
          train_metrics = {**jax.device_get(device_metrics), **throughput.report(step),
                           **(shares if len(shares) > 1 else {})}
          reporter.write(step, train_metrics)
          watch.log(step)  # time/* (the step time split) and memory/*
        with watch.timing("evaluation"):
          eval_metrics = (run_evaluations(evaluations, step, is_last, state["params"], config,
                                          reporter) or eval_metrics)
        saved = step % config.checkpoint.every == 0 or is_last
        if saved:
          with watch.timing("checkpoint"):
            checkpoint.save(manager, step, state, train_iter)
        if preemption.should_stop(step):  # every process stops at the same step
          if not saved:
            with watch.timing("checkpoint"):
              checkpoint.save(manager, step, state, train_iter)
          preempted_at = step
          break
      if previous:
        check_guard(previous[0], jax.device_get(previous[1]), config, manager, reporter.print)
    finally:
      watch.loop_ended()  # the profiler stops; waiting for the last save is checkpointing
      checkpoint.wait_for_saves(manager)  # a started save completes, whatever stops the loop
      watch.switch("other")  # the sample, the last lines
    if preempted_at is not None:
      reporter.print(f"{preemption.signal_name}: saved the checkpoint at step {preempted_at} and "
                     f"stopped (exit code {preemption_lib.EXIT_PREEMPTED}); run the same command "
                     f"again to resume")

    # ---------------------------------------------------------------- A sample
    if (getattr(built.task, "generates", False) and config.log.generate_tokens > 0
        and preempted_at is None):
      text = generate.greedy_continuation(model, lora.model_params(state["params"], config),
                                          tokenizer, config.log.prompt,
                                          config.log.generate_tokens, config.seq_len)
      reporter.print(f"--- greedy continuation of {config.log.prompt!r}:\n"
                     f"{config.log.prompt}{text}\n---")
      reporter.write_text(config.steps, "sample", config.log.prompt + text)
  goodput = watch.finish(int(jax.device_get(state["step"])))  # the goodput line
  reporter.close()
  manager.close()
  return {"train": train_metrics, "eval": eval_metrics, "preempted_at": preempted_at,
          "goodput": goodput}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required, e.g. "
                         "--config configs/lm.py:size=tiny --workdir runs/tiny")
  logging.set_verbosity(logging.WARNING)
  try:
    result = train(_CONFIG.value, _WORKDIR.value, started=STARTED)
  except config_lib.ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  except RunStopped as e:
    print(f"foundation: {e}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_NUMBERS) from None
  except checkpoint.SaveFailed as e:
    print(f"foundation: {e}", file=sys.stderr)
    raise SystemExit(checkpoint.EXIT_SAVE_FAILED) from None
  if result["preempted_at"] is not None:
    raise SystemExit(preemption_lib.EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
