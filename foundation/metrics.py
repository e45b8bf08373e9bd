"""What a run reports: a live console display, TensorBoard event files, metrics.jsonl, and MFU.

Only process 0 writes; every process computes the same numbers.
"""

import json
import math
import os
import time

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (TPU v4/v5e/v5p system
# architecture pages; NVIDIA A100/H100/H200 SXM data sheets, without sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """The device's dense bf16 peak, or None where it is not known (CPUs)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  # Longest name first, so 'TPU v5 lite' wins over 'TPU v5'.
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(name):
      return PEAK_FLOPS[name]
  return None


class Throughput:
  """Step time, examples/s (and tokens/s or patches/s where the task has them) and MFU over the
  steps since the last report."""

  def __init__(self, examples_per_step: int, flops_per_step: float,
               peak_flops_total: float | None, unit: str = "examples", units_per_example: int = 1):
    self.examples_per_step = examples_per_step
    self.unit, self.units_per_example = unit, units_per_example
    self.flops_per_step = flops_per_step
    self.peak_flops_total = peak_flops_total
    self.start(0)

  def start(self, step: int) -> None:
    self.t0, self.step0 = time.perf_counter(), step

  def report(self, step: int) -> dict:
    """The rates since the last report; {} when no timed step has run since (the first step
    compiles, and is not timed)."""
    if step <= self.step0:
      return {}
    seconds = time.perf_counter() - self.t0
    steps = max(step - self.step0, 1)
    step_time = seconds / steps
    out = {"step_time": step_time, "examples_per_sec": self.examples_per_step / step_time}
    if self.unit != "examples":
      out[f"{self.unit}_per_sec"] = self.examples_per_step * self.units_per_example / step_time
    out["tflops_per_device"] = self.flops_per_step / step_time / jax.device_count() / 1e12
    if self.peak_flops_total:
      out["mfu"] = self.flops_per_step / step_time / self.peak_flops_total
    self.start(step)
    return out


def format_metrics(metrics: dict) -> str:
  parts = []
  for key, value in metrics.items():
    if isinstance(value, float):
      value = (f"{value:.3e}" if key == "lr" else f"{value:,.0f}" if key.endswith("_per_sec")
               else f"{value:.1%}" if key == "mfu" else f"{value:.4g}")
    parts.append(f"{key} {value}")
  return "  ".join(parts)


class Reporter:
  """Console progress (a live bar on a terminal, plain lines otherwise), TensorBoard, metrics.jsonl.

  The files (and the workdir) are created at the first record, not before: a run refused before
  its first step prints its lines and leaves no trace on disk.

  metrics.jsonl is strict JSON, one object per line: {"step", "split", metric: value, ...}. A value
  that is not finite is written as null, and the record's "nonfinite" lists those keys. Each start
  of the trainer writes {"step": S, "split": "start", "resumed_from": S or null, "time": ...}
  first: the records after it of steps above S are the ones that count, those before it of the
  same steps were run once more after the resume.
  """

  def __init__(self, workdir: str, total_steps: int, first_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    # Log files and CI get whole lines, not lines wrapped at 80 columns.
    self.console = Console(highlight=False, width=None if Console().is_terminal else 200)
    self.progress = None
    self.tb = None
    self.jsonl = None
    self.sinks = []  # more places every record goes (Weights & Biases: foundation/watch.py)
    if not self.enabled:
      return
    if self.console.is_terminal:
      self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                               TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                               console=self.console)
      self.task = self.progress.add_task("train", total=total_steps, completed=first_step,
                                         status="compiling…")
      self.progress.start()

  def _files(self):
    """(TensorBoard writer, metrics.jsonl), opened at the first record."""
    if self.tb is None:
      os.makedirs(self.workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
      self.tb = SummaryWriter(logdir=self.workdir)
      self.jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
    return self.tb, self.jsonl

  def print(self, text: str) -> None:
    if self.enabled:
      self.console.print(text, markup=False)

  def advance(self, step: int, status: str | None = None) -> None:
    if self.progress is not None:
      fields = {"status": status} if status is not None else {}
      self.progress.update(self.task, completed=step, **fields)

  def _append(self, record: dict) -> None:
    self._files()[1].write(json.dumps(record, allow_nan=False) + "\n")
    self.jsonl.flush()

  def mark_start(self, step: int, resumed: bool) -> None:
    """The restart marker line: this start trains from `step` (a resume: the steps after it that
    metrics.jsonl already holds are run again, and their new records come after this line)."""
    if self.enabled:
      self._append({"step": step, "split": "start", "resumed_from": step if resumed else None,
                    "time": time.time()})

  def add_sink(self, sink) -> None:
    """sink(step, prefix, metrics) is called with every record written from now on."""
    self.sinks.append(sink)

  def write(self, step: int, metrics: dict, prefix: str = "train", echo: bool = True) -> None:
    """Records scalars at `step` under prefix/ in TensorBoard and metrics.jsonl, and prints them
    (unless `echo` is False)."""
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    tb, _ = self._files()
    for key, value in metrics.items():
      tb.add_scalar(f"{prefix}/{key}", value, step)
    nonfinite = [k for k, v in metrics.items() if not math.isfinite(v)]
    record = {"step": step, "split": prefix,
              **{k: (None if k in nonfinite else v) for k, v in metrics.items()}}
    self._append({**record, "nonfinite": nonfinite} if nonfinite else record)
    for sink in self.sinks:
      sink(step, prefix, metrics)
    if not echo:
      return
    line = f"{prefix} step {step:>6}  {format_metrics(metrics)}"
    self.print(line)
    if prefix == "train":
      rate = next((k for k in metrics if k.endswith("_per_sec") and k != "examples_per_sec"),
                  "examples_per_sec")
      self.advance(step, format_metrics({k: metrics[k] for k in ("loss", rate) if k in metrics}))

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._files()[0].add_text(tag, text, step)

  def close(self) -> None:
    if not self.enabled:
      return
    if self.progress is not None:
      self.progress.stop()
    if self.tb is not None:
      self.tb.close()
      self.jsonl.close()
