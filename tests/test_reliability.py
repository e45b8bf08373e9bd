"""Reliability cases found by an outside run against main (issue 16), one test per class: bad
numbers in the config or in an update's result, damaged checkpoint parts, a failed checkpoint
write, an unusable workdir, the litter of refused starts, metrics.jsonl as strict JSON, and the
plain-Orbax restore of docs/reliability.md on another device count. Real trainer runs, real Orbax,
real OS errors. docs/reliability.md lists what each shows.
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import pytest

from foundation import checkpoint
from foundation import config as config_lib
from foundation import train
from test_faults import finish, last_step, small_config, start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_records(workdir) -> list[dict]:
  """metrics.jsonl, every line parsed by a strict JSON parser (NaN or Infinity is an error)."""
  def refuse(name):
    raise ValueError(f"{name} is not JSON")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


# ---------------------------------------------------------------- bad numbers
@pytest.mark.parametrize("field, value", [("optim.lr", float("nan")),
                                          ("model.norm_eps", float("inf")),
                                          ("guard.loss_spike", float("-inf")),
                                          ("data.eval_fraction", float("nan"))])
def test_a_non_finite_float_anywhere_in_the_config_is_refused_naming_it(field, value):
  with pytest.raises(config_lib.ConfigError, match=rf"^{re.escape(field)}=.* is not a finite"):
    config_lib.check_values(small_config(4, **{field: value}))


def test_an_update_whose_result_is_not_finite_is_never_applied(tmp_path):
  # 1e39 is a finite Python float, but infinite in float32: finite loss and gradients, NaN params.
  train.train(small_config(3, **{"optim.lr": 1e39}), str(tmp_path))
  records = {r["step"]: r for r in strict_records(tmp_path) if r["split"] == "train"}
  assert [records[s]["skipped"] for s in (1, 2, 3)] == [1, 2, 3]
  assert [records[s]["nonfinite_update"] for s in (1, 2, 3)] == [1, 1, 1]
  # Nothing was applied: the params (and their norm) are the initial ones, finite.
  norms = {records[s]["param_norm"] for s in (1, 2, 3)}
  assert len(norms) == 1 and None not in norms


# ---------------------------------------------------------------- damaged checkpoint parts
def test_each_damaged_part_of_a_checkpoint_is_set_aside_and_an_older_one_resumed(tmp_path,
                                                                                  capsys):
  train.train(small_config(12, **{"checkpoint.every": 4}), str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["12", "4", "8"]
  (ckpts / "16").mkdir()  # a step folder with nothing in it (no meta/)
  (ckpts / "12" / "meta" / "metadata").write_text("{not json")  # garbled metadata
  for name in os.listdir(ckpts / "8" / "data"):  # the input position, truncated
    (ckpts / "8" / "data" / name).write_bytes(b"")
  (tmp_path / "config.json").write_text("")  # an empty config.json
  capsys.readouterr()

  train.train(small_config(12, **{"checkpoint.every": 4}), str(tmp_path))
  out = capsys.readouterr().out.replace("\n", " ")
  assert f"{tmp_path}/config.json could not be read" in out
  assert f"checkpoint at step 16 could not be read ({ckpts}/16/meta/metadata:" in out
  assert f"checkpoint at step 12 could not be read ({ckpts}/12/meta/metadata:" in out
  assert f"checkpoint at step 8 could not be read ({ckpts}/8/data:" in out
  assert "resumed from the checkpoint at step 4" in out
  aside = sorted(n.split("-")[0] for n in os.listdir(tmp_path / "corrupt_checkpoints"))
  assert aside == ["12", "16", "8", "config.json"]
  assert json.loads((tmp_path / "config.json").read_text())["steps"] == 12  # written again


# ---------------------------------------------------------------- a failed checkpoint write
def largest(folder) -> int:
  return max(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder)
             for f in names)


def test_a_failed_save_stops_at_once_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
  """A real write error, even as root: the trainer's file-size limit (RLIMIT_FSIZE) is lowered
  after the first checkpoint, so the next one's array file gets EFBIG 'File too large', the way a
  full disk gets ENOSPC. The limit lets the small synchronous part (the input position) through,
  so it is the async array write that fails."""
  every = 10
  # A wider MLP keeps the array file well above the input position's (about 320 KB here).
  overrides = {"steps": 40, "checkpoint.every": every, "data.shuffle_buffer": 16,
               "model.mlp_dim": 1024}
  process = start(tmp_path, **overrides)
  first = tmp_path / "checkpoints" / str(every)
  deadline = time.time() + 240
  while not first.exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.01)
  data, state = largest(first / "data"), largest(first / "state")
  assert data < state, (data, state)
  limit = (data + state) // 2
  resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))
  code, out, err = finish(process)

  assert code == checkpoint.EXIT_SAVE_FAILED == 74, err[-3000:]
  assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
  failed = re.search(r"the checkpoint save at step (\d+) failed \((\S+): \[Errno 27\] File too "
                     r"large\); the last good checkpoint, step (\d+), is kept", err)
  assert failed, err[-3000:]
  step, folder, kept = int(failed[1]), failed[2], int(failed[3])
  assert folder == f"{tmp_path}/checkpoints/{step}" and kept == step - every
  # Reported once the failed write ends (a step or a few later), not at the next save.
  print(f"save at step {step} failed; stopped after step {last_step(tmp_path)}")
  assert last_step(tmp_path) < step + every
  assert str(kept) in os.listdir(tmp_path / "checkpoints")

  code, out, err = finish(start(tmp_path, **{**overrides, "steps": kept + 2}))  # no limit now
  assert code == 0, err[-3000:]
  assert f"resumed from the checkpoint at step {kept}" in out


# ---------------------------------------------------------------- the workdir, and refused starts
def test_a_workdir_that_is_a_file_is_refused_in_one_line_exit_1(tmp_path):
  afile = tmp_path / "run.txt"
  afile.write_text("not a folder")
  code, out, err = finish(start(afile))
  assert code == 1, err[-3000:]
  assert err.strip().splitlines()[-1] == (
      f"config error: --workdir {afile} is a file, not a folder: give a folder (one that does "
      f"not exist yet is created)")
  assert "Traceback" not in err


def test_a_workdir_under_a_file_or_unwritable_is_refused_naming_the_path(tmp_path):
  afile = tmp_path / "run.txt"
  afile.write_text("")
  with pytest.raises(config_lib.ConfigError, match=f"{afile} is a file, not a folder"):
    train.train(small_config(2), str(afile / "sub"))
  if os.geteuid() == 0:  # root writes through file modes; sysfs refuses even root
    parent = "/sys"
  else:
    parent = str(tmp_path / "locked")
    os.mkdir(parent, 0o500)
  with pytest.raises(config_lib.ConfigError,
                     match=f"--workdir {parent}/run is not writable: {parent}: .*Permission"):
    train.train(small_config(2), f"{parent}/run")


def test_a_refused_start_writes_nothing(tmp_path):
  new = tmp_path / "new"
  with pytest.raises(config_lib.ConfigError, match="resume=required"):
    train.train(small_config(2, resume="required"), str(new))
  assert not new.exists()

  existing = tmp_path / "existing"
  train.train(small_config(2), str(existing))
  before = {p: os.path.getsize(os.path.join(d, p)) for d, _, names in os.walk(existing)
            for p in names}
  for refused in (small_config(2, **{"model.d_model": 96, "model.head_dim": 24}),  # another run
                  small_config(2, **{"evaluate.every": 1,  # a task file that is not there
                                     "evaluate.tasks": "mc:/nonexistent/quiz.jsonl"})):
    with pytest.raises(config_lib.ConfigError):
      train.train(refused, str(existing))
  after = {p: os.path.getsize(os.path.join(d, p)) for d, _, names in os.walk(existing)
           for p in names}
  assert after == before  # no events file, no metrics line, no config.json rewrite


# ---------------------------------------------------------------- metrics.jsonl
def test_metrics_jsonl_is_strict_json_and_marks_each_start(tmp_path):
  config = small_config(6, **{"checkpoint.every": 4, "guard.inject_nan_at": "2"})
  train.train(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # the next start resumes at 4: 5 and 6 again
  train.train(config, str(tmp_path))

  records = strict_records(tmp_path)
  starts = [r for r in records if r["split"] == "start"]
  assert [(r["step"], r["resumed_from"]) for r in starts] == [(0, None), (4, 4)]
  nan_step = next(r for r in records if r["split"] == "train" and r["step"] == 2)
  assert nan_step["grad_norm"] is None and "grad_norm" in nan_step["nonfinite"]
  # A step run again after the resume comes once before and once after the second start line.
  order = [(r["split"], r["step"]) for r in records if r["split"] in ("start", "train")]
  assert order == [("start", 0)] + [("train", s) for s in range(1, 7)] + [("start", 4)] + [
      ("train", 5), ("train", 6)]


# ---------------------------------------------------------------- the docs' plain-Orbax snippet
def docs_snippet() -> str:
  """The indented code block after 'Plain Orbax reads it' in docs/reliability.md, as written."""
  text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
  after = text.split("Plain Orbax reads it", 1)[1].split("\n\n", 1)[1]
  lines = []
  for line in after.splitlines():
    if line and not line.startswith("    "):
      break
    lines.append(line[4:])
  return "\n".join(lines).strip() + "\n"


def test_the_plain_orbax_snippet_in_the_docs_restores_on_another_device_count(tmp_path):
  snippet = docs_snippet()
  assert "runs/tiny/checkpoints/400/state" in snippet and "import orbax" in snippet
  workdir = tmp_path / "saved"
  train.train(small_config(4), str(workdir))  # saved from 8 devices, fsdp=8
  os.makedirs(tmp_path / "runs" / "tiny" / "checkpoints")
  os.symlink(workdir / "checkpoints" / "4", tmp_path / "runs" / "tiny" / "checkpoints" / "400")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  for devices in (1, 3):  # a laptop, and a count that divides nothing the run split
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180, env={
                             **env, "JAX_PLATFORMS": "cpu",
                             "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["(384,", "64)", "4"], out.stdout
