"""Every notebook in notebooks/ runs top to bottom on a CPU, as a user's Colab CPU runtime would,
with small settings; its outputs are checked (a loss fell, a plot was saved, a sample came out).

The small settings are a cell placed after the notebook's "parameters"-tagged settings cell (as
papermill injects parameters). All notebooks run in ONE Python process, each in its own folder and
namespace, so the suite pays JAX's and TensorFlow's start-up once.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
# name: the cell that makes the notebook small (size=test, a few steps)
SMALL = {
    "quickstart": 'SIZE, STEPS, BATCH_SIZE, EVAL_EVERY = "test", 12, 16, 6',
    "sharding": 'SIZE = "test"',
    # The base: the quickstart notebook's run (size=test, run first), as a user may reuse it.
    "finetuning": ('BASE_SIZE, SFT_STEPS, BATCH_SIZE, SEQ_LEN, RECORDS = "test", 8, 16, 128, 200'
                   '\nBASE = "../quickstart/runs/quickstart"'),
    "vision": 'SIZE, STEPS, EVAL_EVERY, BATCH_SIZE = "test", 40, 20, 32',  # ViTs start slowly
    # Held-out figures at step 0 and the last step only; few clips and scenes synthesised.
    "audio": 'SIZE, STEPS, EVAL_EVERY, NUM_TRAIN = "test", 20, 20, 320',
    "image_text": 'SIZE, STEPS, EVAL_EVERY, NUM_TRAIN = "test", 20, 20, 256',
}
# Runs each (name, script) in its own folder and namespace; stdout and any traceback to files.
RUNNER = """
import contextlib, json, os, sys, time, traceback
root = os.getcwd()
for name, script in json.load(sys.stdin):
  os.makedirs(os.path.join(root, name))
  os.chdir(os.path.join(root, name))
  cpu, wall = time.process_time(), time.time()
  with open("stdout.txt", "w") as out, contextlib.redirect_stdout(out):
    try:
      exec(compile(script, name + ".ipynb", "exec"), {"__name__": "__main__"})
      status = "ok"
    except BaseException:
      status = traceback.format_exc()
  with open("status.txt", "w") as f:
    f.write(status)
  print(f"{name}.ipynb: {time.process_time() - cpu:.0f} s CPU, {time.time() - wall:.0f} s",
        file=sys.stderr)
"""


def load(name: str) -> dict:
  with open(os.path.join(NOTEBOOKS, f"{name}.ipynb")) as f:
    return json.load(f)


def notebook_as_script(notebook: dict, small: str = "") -> str:
  """The code cells in order; IPython-only lines (!shell, %magic) become `pass`; `small` right
  after the cell tagged "parameters"."""
  lines = []
  for cell in notebook["cells"]:
    if cell["cell_type"] != "code":
      continue
    for line in "".join(cell["source"]).splitlines():
      stripped = line.lstrip()
      if stripped.startswith(("!", "%")):
        line = line[:len(line) - len(stripped)] + "pass"
      lines.append(line)
    lines.append("")
    if "parameters" in cell["metadata"].get("tags", []):
      lines += [small, ""]
  return "\n".join(lines)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: (folder, stdout)}: every notebook run once, in one process."""
  root = tmp_path_factory.mktemp("notebooks")
  jobs = [(name, notebook_as_script(load(name), small)) for name, small in SMALL.items()]
  env = {**os.environ, "PYTHONPATH": ROOT, "MPLBACKEND": "Agg"}
  result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), cwd=root,
                          capture_output=True, text=True, timeout=1500, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  print("".join(line + "\n" for line in result.stderr.splitlines() if ".ipynb: " in line))
  return {name: (root / name, (root / name / "stdout.txt").read_text()) for name in SMALL}


def ran(runs, name: str):
  folder, stdout = runs[name]
  status = (folder / "status.txt").read_text()
  assert status == "ok", f"{name}.ipynb failed:\n{status}\n--- its output:\n{stdout[-3000:]}"
  return folder, stdout


def assert_png(path) -> None:
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, path


def losses_fell(stdout: str, label: str = "held-out loss") -> list[tuple[float, float]]:
  """Each '<label>: A at step S -> B at step T' line: B < A, and T > S."""
  found = re.findall(label + r": ([\d.]+) at step (\d+) -> ([\d.]+) at step (\d+)", stdout)
  assert found, f"no '{label}: ...' line in:\n{stdout[-2000:]}"
  for first, first_step, last, last_step in found:
    assert float(last) < float(first) and int(last_step) > int(first_step), found
  return found


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_has_colab_badge_and_settings_cell(name):
  notebook = load(name)
  assert set(SMALL) == {f[:-6] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")}
  intro = "".join(notebook["cells"][0]["source"])
  assert "colab-badge.svg" in intro
  assert "colab.research.google.com/github/" in intro and f"notebooks/{name}.ipynb)" in intro
  tagged = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
  assert len(tagged) == 1  # where the small settings go
  assert all(not c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code")


def test_quickstart_notebook(runs):
  folder, stdout = ran(runs, "quickstart")
  (_, first_step, _, last_step), = losses_fell(stdout)
  assert (first_step, last_step) == ("0", "12")  # untrained, then the last step
  assert_png(folder / "runs" / "quickstart" / "curves.png")  # loss and learning rate
  assert "step 12:\nimport os\n\ndef " in stdout  # the prompt, then the model's continuation
  assert os.path.isdir(folder / "runs" / "quickstart" / "checkpoints" / "12")


def test_sharding_notebook(runs):
  _, stdout = ran(runs, "sharding")
  assert "mesh (data=1, fsdp=4, sequence=1, tensor=2) over 8 cpu devices" in stdout
  assert "embed          -> fsdp" in stdout  # the rules table
  assert stdout.count("CPU 0") >= 3  # visualize_array_sharding's pictures
  # the embedding [vocab, embed] with the rule embed -> None: no longer split over fsdp
  assert "embed/embedding (384, 64) P('tensor', 'fsdp')" in stdout
  assert "embed -> None: P('tensor', None)" in stdout
  # the fit check, compiled for this machine's devices
  assert re.search(r"per device: params [\d.]+ GiB, optimizer state", stdout)
  assert "TPU fit check skipped: it needs libtpu" in stdout  # no libtpu in the test venv


def test_finetuning_notebook(runs):
  folder, stdout = ran(runs, "finetuning")
  runs_dir = folder / "runs" / "finetuning"
  fell = losses_fell(stdout, "held-out answer loss")
  assert len(fell) == 2  # SFT and LoRA
  assert_png(runs_dir / "finetuning.png")
  assert "the base: ../quickstart/runs/quickstart (already trained)" in stdout
  for workdir, step in (("../quickstart/runs/quickstart", 12), ("runs/finetuning/sft", 8),
                        ("runs/finetuning/lora", 8)):
    assert f"[{workdir}, step {step}] Write a function" in stdout  # before, then after
  assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(
      os.listdir(runs_dir / "lora-hf"))
  assert "['LlamaForCausalLM']" in stdout


def test_vision_notebook(runs):
  folder, stdout = ran(runs, "vision")
  losses_fell(stdout)
  assert_png(folder / "runs" / "vision" / "shapes.png")
  assert_png(folder / "runs" / "vision" / "curves.png")
  assert re.search(r"step 40: \d+% of these 20 right", stdout)


def test_audio_notebook(runs):
  folder, stdout = ran(runs, "audio")
  (_, first_step, _, last_step), = losses_fell(stdout)
  assert (first_step, last_step) == ("0", "20")
  assert_png(folder / "runs" / "audio" / "spectrograms.png")  # one clip of each of the 12 kinds
  assert_png(folder / "runs" / "audio" / "curves.png")
  assert "log-mel: 94 frames x 32 mel bins per 1.5 s clip at 8000 Hz" in stdout
  assert re.search(r"held-out accuracy: [\d.]+% at step 0 -> [\d.]+% at step 20 \(chance 8.3%\)",
                   stdout)


def test_image_text_notebook(runs):
  folder, stdout = ran(runs, "image_text")
  losses_fell(stdout)
  assert_png(folder / "runs" / "image_text" / "scenes.png")  # the scenes with their captions
  assert_png(folder / "runs" / "image_text" / "curves.png")
  assert "never in training: blue plus, cyan circle, green diamond, magenta square, " in stdout
  # the evaluators' figures (config.evaluate.tasks), at the random init and the last step
  assert "zero-shot on 200 held-out scenes, retrieval over 64 eval pairs" in stdout
  for name in ("zeroshot/accuracy", "zeroshot/shape_accuracy", "zeroshot/colour_accuracy",
               "retrieval/image_to_text_recall@1", "retrieval/image_to_text_recall@5",
               "retrieval/text_to_image_recall@1", "retrieval/text_to_image_recall@5"):
    assert re.search(rf"\n{name} +[01]\.\d{{3}} +[01]\.\d{{3}}", stdout), name
