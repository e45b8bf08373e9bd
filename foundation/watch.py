"""Watching a run: where its wall time goes (goodput), the step time split, memory, the profiler
window, and optional Weights & Biases.

Every second of a run's wall time, from the start of the process to the goodput line, belongs to
exactly one category of `CATEGORIES`: a `Clock` has one current category, and each switch closes
the time since the last one into it. So the categories add up to the wall time by construction;
nothing is a remainder. The trainer switches the category around its existing calls (the batch,
evaluation, checkpoint saves); what is left in a step (dispatching it, waiting for the device,
the guard check, logging) is the step's compute, counted as useful, redone or compile.

With asynchronous dispatch the host is about one step ahead of the device, so a step's device
time shows where the host waits for it (the guard check of the step before, the metrics at a log
step): the split is of the host's wall time, which is what goodput is about. Data waits are the
host's time in the input pipeline; with tf.data's prefetch they are near zero while the input
keeps up, and they can overlap the device's work on the step before (an upper bound of the
device's idle time for data).
"""

import contextlib
import json
import os
import resource
import sys
import time
import uuid

import jax

from foundation import config as config_lib

# The categories of a run's wall time, in the order of the goodput line.
CATEGORIES = ("useful", "startup", "compile", "data_wait", "checkpoint", "evaluation", "redone",
              "other")
LABELS = {"useful": "useful steps", "startup": "start-up", "compile": "compile",
          "data_wait": "data waits", "checkpoint": "checkpointing", "evaluation": "evaluation",
          "redone": "redone steps", "other": "other"}
# The per-step split of the step time logged as time/*: a step's compute (useful or redone), its
# data wait, its checkpoint saves and the evaluations in it.
STEP_SPLIT = {"compute": ("useful", "redone"), "data_wait": ("data_wait",),
              "checkpoint": ("checkpoint",), "evaluation": ("evaluation",)}
GIB = 2 ** 30


class Clock:
  """Attributes all wall time since `started` (a time.time()) to one category at a time."""

  def __init__(self, started: float | None = None, now=time.perf_counter):
    self.now = now
    t = now()
    # The process's start, taken before the heavy imports, put on this clock's scale.
    self.started = t - (time.time() - started) if started is not None else t
    self.totals = dict.fromkeys(CATEGORIES, 0.0)
    self.current, self.since = "startup", self.started

  def switch(self, category: str) -> str:
    """Makes `category` the current one; returns the one before."""
    t = self.now()
    self.totals[self.current] += t - self.since
    previous, self.current, self.since = self.current, category, t
    return previous

  @contextlib.contextmanager
  def timing(self, category: str):
    """The time inside the block goes to `category`, then the category before comes back."""
    previous = self.switch(category)
    try:
      yield
    finally:
      self.switch(previous)

  def read(self) -> dict:
    """The totals up to now (the current category's running time included) and 'wall'."""
    t = self.now()
    totals = dict(self.totals)
    totals[self.current] += t - self.since
    return {**totals, "wall": t - self.started}


def furthest_step(workdir: str) -> int:
  """The furthest step metrics.jsonl records of earlier starts of this run (0 when none): the
  train and eval records, and each goodput line's last step. A run killed between two log steps
  got up to log.every - 1 steps further than its last record."""
  path = os.path.join(workdir, "metrics.jsonl")
  furthest = 0
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # a line cut by a kill
        continue
      if record.get("split") != "start":
        furthest = max(furthest, int(record.get("last_step", record.get("step", 0)) or 0))
  return furthest


def memory_scalars() -> dict:
  """Device memory in use and at peak (GiB, the largest over this host's devices), from the
  backend's memory_stats() (GPU, TPU). A backend that gives none (the CPU) gets this process's
  resident memory and its peak instead, under other names: the CPU devices' arrays live there."""
  stats = [device.memory_stats() for device in jax.local_devices()]
  if all(stats):
    out = {"device_in_use_gib": max(s.get("bytes_in_use", 0) for s in stats) / GIB,
           "device_peak_gib": max(s.get("peak_bytes_in_use", 0) for s in stats) / GIB}
    limits = [s["bytes_limit"] for s in stats if s.get("bytes_limit")]
    if limits:
      out["device_limit_gib"] = min(limits) / GIB
    return out
  out = {}
  try:  # Linux: resident pages of this process
    with open("/proc/self/statm") as f:
      out["host_rss_gib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
  except (OSError, ValueError, IndexError):
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  peak = peak / GIB * (1 if sys.platform == "darwin" else 1024)
  # The kernel's peak is updated lazily; what is resident now is a peak already reached.
  out["host_peak_rss_gib"] = max(peak, out.get("host_rss_gib", 0.0))
  return out


def describe_memory() -> str:
  """One line saying which memory figures this backend gives."""
  device = jax.local_devices()[0]
  if device.memory_stats():
    return (f"memory: {device.platform} memory_stats() logged as memory/device_in_use_gib and "
            f"memory/device_peak_gib (the largest over this host's devices)")
  return (f"memory: the {device.platform} backend reports no device memory (memory_stats() is "
          f"None); logging this process's resident memory instead (memory/host_rss_gib, "
          f"memory/host_peak_rss_gib)")


class Profiler:
  """A JAX profiler trace of steps start_step .. start_step + steps - 1 (config.profile), written
  under `dir` (default: the workdir) as plugins/profile/<time>/, TensorBoard's profile tab."""

  def __init__(self, config, workdir: str, say=print):
    profile = config.get("profile") or {}
    self.start_step = int(profile.get("start_step", 0))
    self.steps = int(profile.get("steps", 1))
    self.dir = profile.get("dir", "") or workdir
    self.active, self.annotation = False, None
    if self.start_step < 0 or self.steps < 1:
      raise config_lib.ConfigError(
          f"profile.start_step={self.start_step}, profile.steps={self.steps}: the window needs "
          f"start_step >= 1 (0 disables it) and steps >= 1")
    if self.start_step and self.last_step > config.steps:
      raise config_lib.ConfigError(
          f"profile window steps {self.start_step}..{self.last_step} ends after the run's last "
          f"step {config.steps}: lower profile.start_step or profile.steps")
    if self.start_step:
      say(f"profile: steps {self.start_step}..{self.last_step} are traced to "
                       f"{os.path.join(self.dir, 'plugins', 'profile')}")

  @property
  def last_step(self) -> int:
    return self.start_step + self.steps - 1

  def begin_step(self, step: int) -> None:
    if self.start_step and step == self.start_step:
      jax.profiler.start_trace(self.dir)
      self.active = True
    if self.active:  # the profile's step view finds steps by this annotation
      self.annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self.annotation.__enter__()

  def end_step(self, step: int, state) -> None:
    if not self.active:
      return
    self.annotation.__exit__(None, None, None)
    self.annotation = None
    if step == self.last_step:
      jax.block_until_ready(state)  # the window's device work belongs in the trace
      self.stop()

  def stop(self) -> None:
    """Closes the trace (at the window's end, or when the loop ends inside it)."""
    if self.annotation is not None:
      self.annotation.__exit__(None, None, None)
      self.annotation = None
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


class WandB:
  """Weights & Biases logging of every record (config.log.wandb_project; process 0 only). wandb
  is imported at start-up (missing: a config error) and its run starts at the first record, so a
  refused start leaves nothing behind."""

  def __init__(self, config, workdir: str):
    try:
      import wandb
    except ImportError:
      raise config_lib.ConfigError(
          f"log.wandb_project={config.log.wandb_project!r} needs wandb: pip install wandb "
          f"(and wandb login), or leave log.wandb_project empty") from None
    self.wandb, self.config, self.workdir, self.run = wandb, config, workdir, None

  def start(self):
    id_path = os.path.join(self.workdir, "wandb_id")  # a resumed run goes on in the same W&B run
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else uuid.uuid4().hex[:12]
    with open(id_path, "w") as f:
      f.write(run_id)
    self.run = self.wandb.init(project=self.config.log.wandb_project, id=run_id, resume="allow",
                               name=os.path.basename(os.path.abspath(self.workdir)),
                               dir=self.workdir, config=self.config.to_dict())
    self.run.define_metric("trainer/step")
    self.run.define_metric("*", step_metric="trainer/step")  # redone steps may repeat a step

  def __call__(self, step: int, prefix: str, metrics: dict) -> None:
    if self.run is None:
      self.start()
    self.run.log({"trainer/step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}})

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()


class Watch:
  """What the trainer calls: the clock, the time split, memory, the profiler, goodput, W&B."""

  def __init__(self, config, workdir: str, reporter, started: float | None = None):
    self.clock = Clock(started)
    self.reporter = reporter
    self.profiler = Profiler(config, workdir, reporter.print)
    self.furthest_before = furthest_step(workdir)
    self.first_step = None   # the first step this start runs: it compiles
    self.steps_run = self.steps_redone = 0
    self.interval = None     # (totals, step) at the start of the current time/* interval
    self.wandb = None
    if config.log.get("wandb_project") and jax.process_index() == 0:
      self.wandb = WandB(config, workdir)
      reporter.add_sink(self.wandb)
    reporter.print(describe_memory())

  def timing(self, category: str):
    return self.clock.timing(category)

  def switch(self, category: str) -> str:
    return self.clock.switch(category)

  def begin_step(self, step: int) -> None:
    """At the top of each step: its time is compile (the first of this start), redone (a step an
    earlier start reached, metrics.jsonl says) or useful."""
    if self.first_step is None:
      self.first_step = step
      category = "compile"
    else:
      category = "redone" if step <= self.furthest_before else "useful"
      if self.interval is None:  # time/* intervals start after the compiled step, as rates do
        self.interval = (self.clock.read(), step - 1)
    self.clock.switch(category)
    self.steps_run += 1
    self.steps_redone += step <= self.furthest_before
    self.profiler.begin_step(step)

  def end_step(self, step: int, state) -> None:
    """After the step is dispatched: closes the profiler window after its last step."""
    self.profiler.end_step(step, state)

  def loop_ended(self) -> None:
    """However the loop ended (an error too): the trace is closed, the last save's wait is
    checkpointing."""
    self.profiler.stop()
    self.clock.switch("checkpoint")

  def step_split(self, step: int) -> dict:
    """The step time split, seconds per step since the last call (none before a timed step)."""
    if self.interval is None or step <= self.interval[1]:
      return {}
    then, now = self.interval[0], self.clock.read()
    steps = step - self.interval[1]
    self.interval = (now, step)
    return {name: sum(now[c] - then[c] for c in parts) / steps
            for name, parts in STEP_SPLIT.items()}

  def log(self, step: int) -> None:
    """At a log step: the time split (time/*) and memory (memory/*), to TensorBoard, metrics.jsonl
    and W&B (not the console: the goodput line sums them up at the end)."""
    split = self.step_split(step)
    if split:
      self.reporter.write(step, split, prefix="time", echo=False)
    self.reporter.write(step, memory_scalars(), prefix="memory", echo=False)

  def goodput(self, last_step: int) -> dict:
    """The goodput record: each category's seconds (`<category>_s`) and share of the wall time."""
    totals = self.clock.read()
    wall = totals.pop("wall")
    record = {"wall_s": wall, "goodput": totals["useful"] / wall if wall > 0 else 0.0}
    for category in CATEGORIES:
      record[f"{category}_s"] = totals[category]
      record[f"{category}_share"] = totals[category] / wall if wall > 0 else 0.0
    return {**record, "last_step": last_step, "steps_run": self.steps_run,
            "steps_redone": self.steps_redone}

  def finish(self, last_step: int) -> dict:
    """The goodput line on the console, and its record in metrics.jsonl and TensorBoard."""
    record = self.goodput(last_step)
    self.reporter.print(format_goodput(record))
    self.reporter.write(last_step, record, prefix="goodput", echo=False)
    if self.wandb:
      self.wandb.close()
    return record


def format_goodput(record: dict) -> str:
  """'goodput 61.2% of 48.3 s: useful steps 29.6 s (61.2%), start-up ...'"""
  parts = [f"{LABELS[c]} {record[c + '_s']:.1f} s ({record[c + '_share']:.1%})"
           for c in CATEGORIES]
  redone = (f"; {record['steps_redone']} of {record['steps_run']} steps redone after the restart"
            if record["steps_redone"] else "")
  return f"goodput {record['goodput']:.1%} of {record['wall_s']:.1f} s: {', '.join(parts)}{redone}"
