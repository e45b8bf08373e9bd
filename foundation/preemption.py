"""Preemption: a SIGTERM (or Ctrl-C) asks the trainer to save and stop at a step all hosts agree on.

Schedulers (TPU VMs, SLURM, Kubernetes) send SIGTERM some seconds before they kill a job. The
trainer asks `Preemption.should_stop(step)` after every step; when it says yes, the trainer saves
that step, waits for the save to commit and exits with EXIT_PREEMPTED.

With several processes, JAX's preemption sync manager (started by `jax.distributed.initialize`)
catches SIGTERM on whichever host gets it, tells the others, and picks the step at which all of
them stop (`multihost_utils.reached_preemption_sync_point`): every host saves the same step. With
one process a Python signal handler does it. Ctrl-C is turned into the same request; a second
Ctrl-C stops at once.
"""

import os
import signal

from jax._src import distributed
from jax.experimental import multihost_utils

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". The state was saved:
# start the same command again to resume.
EXIT_PREEMPTED = 75


class Preemption:
  """Watches for a preemption notice; use as a context manager around the train loop."""

  def __init__(self):
    self.multi_process = distributed.global_state.client is not None
    self.signal_name = None
    self._previous = {}

  def __enter__(self) -> "Preemption":
    if not self.multi_process:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
    # With several processes JAX's own handler owns SIGTERM; Ctrl-C is forwarded to it.
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      # The next Ctrl-C is a plain KeyboardInterrupt: stop now, without a save.
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
      if self.multi_process:
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's sync manager tells the other processes
    self.signal_name = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    """True at the step where this run (all its processes) must save and stop.

    Call it after every step, with the same step numbers on every process.
    """
    if self.multi_process:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None
