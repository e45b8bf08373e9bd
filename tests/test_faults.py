"""Fault injection on real processes: signals, kills mid-save, NaNs, corrupted files, fewer devices
(two processes of which one is preempted: tests/test_faults_multihost.py). After each, the resumed
run must match an uninterrupted one (exactly on the same topology, to float32 tolerance across
topologies). docs/reliability.md tabulates what these tests show.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lm
from foundation import checkpoint
from foundation import config as config_lib
from foundation import step as step_lib
from foundation import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
OVERRIDES = {"steps": STEPS, "optim.decay_steps": STEPS, "checkpoint.every": 8, "eval.every": 0,
             "log.every": 1, "log.generate_tokens": 0}


def losses(workdir) -> dict[int, float]:
  """The train loss of each step in metrics.jsonl (a step run again after a resume: the last)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      record = json.loads(line)
      if record["split"] == "train":
        out[record["step"]] = record["loss"]
  return out


def last_step(workdir) -> int:
  return max(losses(workdir), default=0)


def command(workdir, **overrides) -> list[str]:
  args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
  return [sys.executable, "-m", "foundation.train", "--config",
          os.path.join(ROOT, "configs", "lm.py") + ":size=test", "--workdir", str(workdir), *args]


def start(workdir, devices: int = 8, env=None, **overrides) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         **(env or {})}
  return subprocess.Popen(command(workdir, **overrides), cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process, timeout=300) -> tuple[int, str, str]:
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def run(workdir, devices: int = 8, **overrides) -> tuple[int, str, str]:
  return finish(start(workdir, devices, **overrides))


def wait_for_step(workdir, step: int, process, timeout=240) -> None:
  deadline = time.time() + timeout
  while last_step(workdir) < step:
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, f"no step {step} in {timeout} s"
    time.sleep(0.02)


def assert_same_losses(workdir, expected, steps=range(1, STEPS + 1), rtol=0.0):
  got = losses(workdir)
  assert sorted(got) == sorted(expected) == list(steps), (sorted(got), sorted(expected))
  if rtol:
    np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=rtol)
  else:
    assert [got[s] for s in steps] == [expected[s] for s in steps]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: the same command run once from start to end, nothing injected."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  code, _, err = run(workdir)
  assert code == 0, err[-3000:]
  return losses(workdir)


def test_sigterm_saves_the_current_step_and_the_restart_matches(uninterrupted, tmp_path):
  process = start(tmp_path)
  wait_for_step(tmp_path, 11, process)
  process.send_signal(signal.SIGTERM)
  code, out, _ = finish(process)
  assert code == 75, out[-2000:]
  stopped = int(out.split("saved the checkpoint at step ")[1].split()[0])
  assert "SIGTERM: saved the checkpoint at step" in out
  assert 11 <= stopped < STEPS
  # The step it stopped at was saved, whatever the checkpoint.every schedule.
  assert str(stopped) in os.listdir(tmp_path / "checkpoints")
  assert last_step(tmp_path) == stopped  # it finished the step it was in, and no more

  code, out, err = run(tmp_path)
  assert code == 0, err[-3000:]
  assert f"resumed from the checkpoint at step {stopped}" in out
  assert_same_losses(tmp_path, uninterrupted)


def test_sigkill_during_an_async_save_leaves_only_complete_checkpoints(uninterrupted, tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  killed_mid_save = 0
  for attempt in range(6):  # each attempt kills the run while a save is being written
    process = start(tmp_path, **{"checkpoint.every": 2})
    first = last_step(tmp_path)
    wait_for_step(tmp_path, first + 3, process)
    while process.poll() is None:
      names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
      if any(checkpoint.TMP_SUFFIX in n for n in names):
        process.kill()  # SIGKILL: no handler runs, the save is cut short
        break
    process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before a save was caught"
    partial = [n for n in os.listdir(ckpt_dir) if checkpoint.TMP_SUFFIX in n]
    complete = [n for n in os.listdir(ckpt_dir) if n.isdigit()]
    # A partial save never sits beside a complete checkpoint of the same step.
    assert all(n.split(".")[0] not in complete for n in partial), (partial, complete)
    killed_mid_save += bool(partial)
    if killed_mid_save:
      break
    code, out, err = run(tmp_path, **{"steps": last_step(tmp_path) + 8, "checkpoint.every": 2})
    assert code == 0, err[-3000:]
    if partial:
      assert f"deleted {len(partial)} incomplete checkpoint save(s)" in out
  assert killed_mid_save >= 1, "no kill landed during a save"

  code, out, err = run(tmp_path)
  assert code == 0, err[-3000:]
  assert f"deleted 1 incomplete checkpoint save(s) that a kill left behind: {partial[0]}" in out
  assert not [n for n in os.listdir(ckpt_dir) if checkpoint.TMP_SUFFIX in n]
  assert_same_losses(tmp_path, uninterrupted)


def small_config(steps: int, **changes):
  config = lm.get_config("size=test")
  with config.unlocked():
    for dotted, value in {**OVERRIDES, "steps": steps, **changes}.items():
      group, _, key = dotted.rpartition(".")
      node = config
      for part in group.split(".") if group else []:
        node = node[part]
      node[key] = value
  return config


def read_jsonl(workdir) -> dict[int, dict]:
  return {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if r["split"] == "train"}


def test_an_injected_nan_is_skipped_and_leaves_the_params_bit_identical(tmp_path):
  train.train(small_config(8, **{"guard.inject_nan_at": "5"}), str(tmp_path))
  records = read_jsonl(tmp_path)
  assert records[5]["grad_norm"] is None and records[5]["nonfinite"] == ["grad_norm"]  # NaN
  assert [records[s]["skipped"] for s in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert records[5]["param_norm"] == records[4]["param_norm"]  # nothing applied at step 5
  assert records[6]["param_norm"] != records[5]["param_norm"]  # step 6 trains again
  assert all(np.isfinite(records[s]["loss"]) for s in (6, 7, 8))


def test_the_stop_policy_names_the_step_and_the_restart_matches(uninterrupted, tmp_path):
  code, _, err = run(tmp_path, **{"guard.inject_nan_at": "13", "guard.nonfinite": "stop"})
  assert code == 3, err[-3000:]
  assert "stopped at step 13 (guard.nonfinite=stop); the last checkpoint is step 8" in err
  assert "Traceback" not in err
  code, out, err = run(tmp_path)  # the same run, nothing injected: it resumes from step 8
  assert code == 0, err[-3000:]
  assert "resumed from the checkpoint at step 8" in out
  assert_same_losses(tmp_path, uninterrupted)


def test_a_run_of_nans_stops_after_max_skips_in_a_row(tmp_path):
  config = small_config(12, **{"guard.inject_nan_at": "3,4,5", "guard.max_skips_in_a_row": 3})
  with pytest.raises(train.RunStopped, match=r"stopped at step 5 \(3 skipped steps in a row"):
    train.train(config, str(tmp_path))


def test_the_loss_spike_guard_skips_far_above_the_recent_mean():
  config = small_config(4, **{"guard.loss_spike": 2.0, "guard.spike_warmup": 3})
  guard = step_lib.initial_guard()
  applied = []
  for loss in (4.0, 4.2, 3.8, 3.9, 9.0, 3.7, float("nan")):
    ok, guard = step_lib.guard_update(guard, np.float32(loss), np.float32(1.0), config)
    applied.append(bool(ok))
  assert applied == [True, True, True, True, False, True, False]
  assert int(guard["skipped"]) == 2 and int(guard["skipped_in_a_row"]) == 1
  assert 3.9 < float(guard["loss_mean"]) < 4.1  # the spike never entered the mean


def largest_file(folder) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def test_a_corrupted_checkpoint_is_set_aside_and_the_one_before_resumed(uninterrupted, tmp_path):
  code, _, err = run(tmp_path, steps=24)
  assert code == 0, err[-3000:]
  victim = largest_file(tmp_path / "checkpoints" / "24" / "state")
  with open(victim, "r+b") as f:  # garbage over the array data
    f.write(b"\x00garbage" * (os.path.getsize(victim) // 8))
  code, out, err = run(tmp_path)
  assert code == 0, err[-3000:]
  assert "WARNING: the checkpoint at step 24 could not be read" in out
  assert "resumed from the checkpoint at step 16" in out
  assert os.listdir(tmp_path / "corrupt_checkpoints")[0].startswith("24-")
  assert_same_losses(tmp_path, uninterrupted)


def test_a_restart_on_fewer_devices_and_another_layout_matches(uninterrupted, tmp_path):
  code, _, err = run(tmp_path, steps=16)  # 8 devices, fsdp=8
  assert code == 0, err[-3000:]
  code, out, err = run(tmp_path, devices=4, **{"mesh.fsdp": 2, "mesh.tensor": 2})
  assert code == 0, err[-3000:]
  assert "mesh (data=1, fsdp=2, sequence=1, tensor=2) over 4 cpu devices" in out
  assert "resumed from the checkpoint at step 16" in out
  assert_same_losses(tmp_path, uninterrupted, rtol=1e-5)


def test_plain_orbax_reads_a_checkpoint_without_the_project(tmp_path):
  train.train(small_config(4), str(tmp_path))
  # What a user without foundation would write: only Orbax and the folder layout.
  script = (
      "import orbax.checkpoint as ocp, json, sys\n"
      "state = ocp.StandardCheckpointer().restore(sys.argv[1] + '/checkpoints/4/state')\n"
      "p = state['params']\n"
      "print(json.dumps({'step': int(state['step']), 'embed': list(p['embed']['embedding'].shape),"
      " 'keys': sorted(p)}))\n")
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                       text=True, timeout=120, cwd="/", env={
                           k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert out.returncode == 0, out.stderr[-3000:]
  read = json.loads(out.stdout.strip().splitlines()[-1])
  assert read["step"] == 4 and read["embed"] == [384, 64]
  assert "embed" in read["keys"]
  meta = json.loads((tmp_path / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["step"] == 4


def test_resume_required_refuses_an_empty_workdir(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="resume=required but .* holds no complete"):
    train.train(small_config(4, resume="required"), str(tmp_path))


def test_a_workdir_of_another_config_is_refused_naming_the_fields(tmp_path):
  train.train(small_config(4), str(tmp_path))
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.d_model: 64 -> 96; model.head_dim: 16 -> 24; optim.lr: 0.003 -> 0.001"):
    train.train(small_config(8, **{"model.d_model": 96, "model.head_dim": 24, "optim.lr": 1e-3}),
                str(tmp_path))
  # What may change on resume (steps, checkpointing, logging, the mesh) does.
  train.train(small_config(8, **{"checkpoint.every": 2, "log.every": 2}), str(tmp_path))
  assert last_step(tmp_path) == 8


def test_init_from_loads_params_only_and_lists_mismatches(tmp_path):
  base = str(tmp_path / "base")
  train.train(small_config(4), base)
  saved = checkpoint.load_params(base, abstract_params(small_config(4)))[0]

  tuned = str(tmp_path / "tuned")
  result = train.train(small_config(2, init_from=base, **{"optim.warmup_steps": 1}), tuned)
  assert result["train"]
  first = read_jsonl(tuned)[1]
  assert first["lr"] == 0.0  # a fresh optimizer and schedule: step 1 of this run
  # The first step of the tuned run starts from the base params: its param norm before the update
  # is the base's (lr is 0 at step 1, so after it too).
  base_norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(saved))))
  assert first["param_norm"] == pytest.approx(base_norm, rel=1e-6)

  wider = small_config(2, init_from=base, **{"model.mlp_dim": 192})
  with pytest.raises(config_lib.ConfigError, match=r"shapes differ: .*mlp.*128\) on disk"):
    train.train(wider, str(tmp_path / "wider"))
  with wider.unlocked():
    wider.init_from_partial = True
  train.train(wider, str(tmp_path / "wider"))  # loads what matches, initialises the MLP


def abstract_params(config):
  from foundation import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from foundation import optim  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, _ = step_lib.state_shardings(step_lib.make_model(config), optim.make_optimizer(config),
                                         config, mesh)
  return abstract["params"]
