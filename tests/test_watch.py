"""Watching a run (foundation/watch.py): the scalars TensorBoard reads back, the profiler trace of
the chosen steps, and goodput shares that add up to the wall time, on a real trainer run and its
resume after a lost checkpoint."""

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from configs import lm
from foundation import checkpoint
from foundation import config as config_lib
from foundation import watch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "lm.py")


def run_trainer(workdir, steps: int) -> tuple[str, float]:
  """`python -m foundation.train` on the test model: (stdout, elapsed seconds)."""
  started = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "foundation.train", "--config", f"{CONFIG}:size=test",
       "--workdir", str(workdir), f"--config.steps={steps}", "--config.checkpoint.every=4",
       "--config.eval.every=4", "--config.log.generate_tokens=0",
       "--config.profile.start_step=3", "--config.profile.steps=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  elapsed = time.time() - started
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, elapsed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 6-step run that traces steps 3-4 (checkpoints at 4 and 6), then, with checkpoint 6 lost as
  a kill before that save would lose it, the same run resumed to step 8: it redoes steps 5-6."""
  workdir = tmp_path_factory.mktemp("watch") / "run"
  first_out, first_elapsed = run_trainer(workdir, 6)
  shutil.rmtree(workdir / "checkpoints" / "6")
  second_out, second_elapsed = run_trainer(workdir, 8)
  return {"workdir": workdir, "out": (first_out, second_out),
          "elapsed": (first_elapsed, second_elapsed)}


def goodput_records(workdir) -> list[dict]:
  with open(workdir / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if r["split"] == "goodput"]


def test_event_files_hold_every_scalar_of_a_watched_run(runs):
  from tensorboard.backend.event_processing import event_accumulator  # TensorBoard's own reader
  accumulator = event_accumulator.EventAccumulator(
      str(runs["workdir"]), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  tags = set(accumulator.Tags()["scalars"])
  # On CPUs memory_stats() is None: the process's resident memory is logged under its own name.
  memory = ({"memory/host_rss_gib", "memory/host_peak_rss_gib"}
            if "memory/device_in_use_gib" not in tags else
            {"memory/device_in_use_gib", "memory/device_peak_gib"})
  expected = {"train/step_time", "time/compute", "time/data_wait", "time/checkpoint",
              "time/evaluation", "train/grad_norm", "train/param_norm", "train/lr",
              "goodput/goodput", *memory,
              *(f"goodput/{c}_share" for c in watch.CATEGORIES)}
  assert expected <= tags, sorted(expected - tags)

  def values(tag):
    return {event.step: event.value for event in accumulator.Scalars(tag)}

  # The step split starts after the compiled step; the interval after step 4 holds its
  # evaluation and checkpoint save.
  assert min(values("time/compute")) == 2
  assert all(v > 0 for v in values("time/compute").values())
  assert values("time/checkpoint")[5] > 0 and values("time/evaluation")[5] > 0
  assert values("time/checkpoint")[3] == 0
  for tag in memory:
    assert all(0 < v < 1024 for v in values(tag).values()), tag
  assert all(v > 0 for v in values("train/param_norm").values())
  assert values("train/lr")[1] == 0.0 and values("train/lr")[2] > 0  # the warmup's first step


def test_profile_traces_the_chosen_steps(runs):
  traces = glob.glob(str(runs["workdir"] / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1, traces  # the resumed run started past the window: no second trace
  assert "profile: steps 3..4 are traced to" in runs["out"][0]
  trace_json = glob.glob(os.path.join(os.path.dirname(traces[0]), "*.trace.json.gz"))
  with gzip.open(trace_json[0]) as f:
    events = json.load(f)["traceEvents"]
  steps = {int(e["args"]["step_num"]) for e in events if e.get("name") == "train"}
  assert steps == {3, 4}


def test_goodput_shares_add_up_to_the_wall_time(runs):
  records = goodput_records(runs["workdir"])
  assert len(records) == 2
  for record, elapsed, out in zip(records, runs["elapsed"], runs["out"]):
    seconds = sum(record[f"{c}_s"] for c in watch.CATEGORIES)
    assert seconds == pytest.approx(record["wall_s"], rel=1e-9)
    assert sum(record[f"{c}_share"] for c in watch.CATEGORIES) == pytest.approx(1.0, abs=1e-9)
    assert record["goodput"] == record["useful_share"]
    # The wall time is the process's, from before its imports to the goodput line.
    assert 0.5 * elapsed < record["wall_s"] <= elapsed
    for category in ("useful", "startup", "compile", "checkpoint", "evaluation"):
      assert record[f"{category}_s"] > 0, category
    assert out.count("\ngoodput ") == 1 and f"of {record['wall_s']:.1f} s: useful steps" in out
  assert records[0]["redone_s"] == 0 and records[0]["steps_redone"] == 0


def test_a_resumed_run_counts_the_steps_it_redoes(runs):
  first, second = goodput_records(runs["workdir"])
  assert first["last_step"] == 6 and second["last_step"] == 8
  # Restored at step 4, while the run before reached step 6: steps 5 and 6 ran again (step 5
  # compiled, so its time is compile; step 6's is redone).
  assert second["steps_run"] == 4 and second["steps_redone"] == 2
  assert second["redone_s"] > 0
  assert "2 of 4 steps redone after the restart" in runs["out"][1]


# ---------------------------------------------------------------- without a trainer run
def test_clock_puts_every_second_in_one_category():
  now = [100.0]
  clock = watch.Clock(now=lambda: now[0])
  now[0] += 2                          # start-up
  clock.switch("compile"); now[0] += 5
  clock.switch("useful"); now[0] += 1
  with clock.timing("data_wait"):
    now[0] += 0.5
    with clock.timing("checkpoint"):
      now[0] += 0.25
  now[0] += 1                          # back in the step
  totals = clock.read()
  assert totals == {**dict.fromkeys(watch.CATEGORIES, 0.0), "startup": 2, "compile": 5,
                    "useful": 2, "data_wait": 0.5, "checkpoint": 0.25, "wall": 9.75}


def test_furthest_step_reads_earlier_starts(tmp_path):
  assert watch.furthest_step(str(tmp_path)) == 0
  lines = [{"step": 0, "split": "start", "resumed_from": None}, {"step": 7, "split": "train"},
           {"step": 8, "split": "eval"}, {"step": 4, "split": "start", "resumed_from": 4},
           {"step": 6, "split": "train"}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines)
                                          + '{"step": 9, "spl')  # a line cut by a kill
  assert watch.furthest_step(str(tmp_path)) == 8


def test_profile_window_errors_are_one_line(tmp_path):
  config = lm.get_config("size=test")
  with config.unlocked():
    config.profile.start_step = 19
    config.profile.steps = 5
  with pytest.raises(config_lib.ConfigError, match=r"profile window steps 19\.\.23 ends after "
                                                   r"the run's last step 20"):
    watch.Profiler(config, str(tmp_path))
  with config.unlocked():
    config.profile.start_step = 1
    config.profile.steps = 0
  with pytest.raises(config_lib.ConfigError, match=r"profile.steps=0"):
    watch.Profiler(config, str(tmp_path))


def test_a_workdir_from_before_the_profile_group_resumes():
  config = lm.get_config("size=test")
  saved = config.to_dict()
  del saved["profile"]
  with config.unlocked():
    config.profile.start_step = 3
  assert checkpoint.config_differences(saved, config) == []


def test_wandb_without_the_package_is_a_config_error(tmp_path):
  try:
    import wandb  # noqa: F401
    pytest.skip("checks the error when wandb is absent, and wandb is installed in this environment")
  except ImportError:
    pass
  config = lm.get_config("size=test")
  with config.unlocked():
    config.log.wandb_project = "foundation"
  with pytest.raises(config_lib.ConfigError, match="needs wandb: pip install wandb"):
    watch.WandB(config, str(tmp_path))


def test_a_run_stopped_inside_the_window_still_closes_its_trace(tmp_path):
  import jax
  from foundation import train
  config = lm.get_config("size=test")
  with config.unlocked():
    config.steps = 6
    config.eval.every = 0
    config.log.generate_tokens = 0
    config.guard.nonfinite, config.guard.inject_nan_at = "stop", "2"  # stops in step 3
    config.profile.start_step, config.profile.steps = 1, 4
  with pytest.raises(train.RunStopped, match="stopped at step 2"):
    train.train(config, str(tmp_path / "run"))
  assert glob.glob(str(tmp_path / "run" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  jax.profiler.start_trace(str(tmp_path / "again"))  # refused if the run's trace were still open
  jax.profiler.stop_trace()
