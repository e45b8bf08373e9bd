"""Fault injection on two real processes (4 CPU devices each, gloo over loopback), one of which is
preempted: both stop at the same step and the resumed run matches an uninterrupted two-process run
exactly. A file of its own, beside tests/test_faults.py, so that `pytest -n 2` runs the two at once.
"""

import os
import signal
import socket
import subprocess

from test_faults import assert_same_losses, finish, losses, start, wait_for_step


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two(workdir, port, **overrides) -> list[subprocess.Popen]:
  return [start(workdir, devices=4, env={
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu"}, **overrides) for i in range(2)]


TWO_STEPS = 16  # a step with two processes over gloo takes ~0.45 s here


def test_two_processes_stop_at_the_same_step_when_one_is_preempted(tmp_path):
  reference = tmp_path / "reference"
  results = [finish(p) for p in start_two(reference, free_port(), steps=TWO_STEPS)]
  assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]

  workdir = tmp_path / "preempted"
  processes = start_two(workdir, free_port(), steps=TWO_STEPS)
  wait_for_step(workdir, 5, processes[0])
  processes[1].send_signal(signal.SIGTERM)  # only the second host gets the notice
  results = [finish(p) for p in processes]
  assert [r[0] for r in results] == [75, 75], results[0][2][-2000:] + results[1][2][-2000:]
  stopped = int(results[0][1].split("saved the checkpoint at step ")[1].split()[0])
  assert str(stopped) in os.listdir(workdir / "checkpoints")
  data_files = os.listdir(workdir / "checkpoints" / str(stopped) / "data")
  assert any(n.startswith("process_0of2") for n in data_files)
  assert any(n.startswith("process_1of2") for n in data_files)

  results = [finish(p) for p in start_two(workdir, free_port(), steps=TWO_STEPS)]
  assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
  assert f"resumed from the checkpoint at step {stopped}" in results[0][1]
  assert_same_losses(workdir, losses(reference), steps=range(1, TWO_STEPS + 1))
