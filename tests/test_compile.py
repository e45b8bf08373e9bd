"""The TPU fit check: `python -m foundation.compile` for a real TPU topology on this CPU machine.

libtpu (from PyPI) is kept out of the project's environment, because it makes every CPU run print
TPU initialisation errors: this test makes a separate environment, .venv-tpu, the first time.
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import types

import jax
import pytest

from configs import lm
from foundation import compile as compile_lib
from foundation import config as config_lib
from foundation import mesh as mesh_lib
from foundation.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.path.join(ROOT, ".venv-tpu", "bin", "python")


def tpu_python() -> str:
  """A Python with libtpu and the project's dependencies, made on first use."""
  if os.path.exists(TPU_PYTHON):
    return TPU_PYTHON
  steps = [[sys.executable, "-m", "venv", os.path.join(ROOT, ".venv-tpu")],
           [TPU_PYTHON, "-m", "pip", "install", "-q", f"jax[tpu]=={jax.__version__}", "flax",
            "optax", "orbax-checkpoint", "ml-collections", "absl-py"]]
  for step in steps:
    result = subprocess.run(step, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
      pytest.skip(f"libtpu cannot be installed here ({' '.join(step[:4])}…): "
                  f"{result.stderr.strip()[-500:]}")
  return TPU_PYTHON


def run_compile(python: str, *args: str):
  return subprocess.run(
      [python, "-m", "foundation.compile", "--config", "configs/lm.py:size=test", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT, "TPU_WORKER_HOSTNAMES": "localhost",
           "XLA_FLAGS": ""})


def test_fit_check_for_a_small_tpu_topology(tmp_path):
  report_file = tmp_path / "fit.json"
  result = run_compile(tpu_python(), "--topology", "v5p:2x2x2", "--json", str(report_file))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "on v5p:2x2x2: 8 x TPU v5, mesh fsdp=8" in out
  assert "per device: params" in out and "activations/temporaries" in out
  assert "fits: " in out and "of 95 GiB HBM" in out
  import json
  report = json.loads(report_file.read_text())
  assert report["fits"] is True and report["devices"] == 8
  assert 0 < report["bytes"]["params"] < report["bytes"]["total"] < 95 * 2 ** 30


def test_fit_check_across_two_slices():
  result = run_compile(tpu_python(), "--topology", "v5p:2x2x2", "--num_slices", "2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("mesh (data=2 (1 in-slice x 2 across), fsdp=8, sequence=1, tensor=1) over 16 tpu "
          "devices, 2 slice(s)") in result.stdout


def test_a_step_too_big_for_the_chip_is_reported_not_crashed():
  # 262,144 rows x 128 positions x 384 logits in float32 alone are 48 GiB; a v5e chip has 16.
  result = run_compile(tpu_python(), "--topology", "TPU v5 lite:2x2",
                       "--config.batch_size=262144", "--config.seq_len=128")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "does not fit: the compiler refused it: RESOURCE_EXHAUSTED" in result.stdout


def test_without_libtpu_the_error_says_how_to_get_it():
  result = run_compile(sys.executable, "--topology", "v5p:2x2x2")
  if result.returncode == 0:
    pytest.skip("libtpu is installed in this environment")
  assert "config error: cannot describe TPU topology 'v5p:2x2x2'" in result.stderr
  assert "pip install 'jax[tpu]==" in result.stderr


def test_report_says_by_how_much_it_does_not_fit():
  GiB = 2 ** 30
  report = {"size": "7b", "params": 6.7e9, "devices": 64, "device_kind": "TPU v5",
            "mesh": {"data": 1, "fsdp": 64, "sequence": 1, "tensor": 1}, "remat_policy": "full",
            "batch_size": 1024, "seq_len": 4096, "hbm_bytes": 95 * GiB, "fits": False,
            "layout": "mesh (data=1, fsdp=64, sequence=1, tensor=1) over 64 tpu devices",
            "compiled_flops_per_device": 1.7e14, "model_flops_per_step": 1.93e17,
            "bytes": {"params": 0.39 * GiB, "optimizer_state": 0.78 * GiB, "batch": 0.001 * GiB,
                      "temporaries": 108.0 * GiB, "total": 109.29 * GiB}}
  text = compile_lib.format_report(report, "v5p:4x4x4")
  assert "mesh fsdp=64" in text
  assert "does not fit, by 14.29 GiB (109.29 GiB needed, 95 GiB HBM per chip)" in text


# Each size's smallest slice in docs/scaling.md (fewest chips, then least HBM); 3b gets 1b's.
SMALLEST_SLICE = {"1b": "v4:2x2x2", "3b": "v4:2x2x2", "7b": "TPU v5 lite:8x8",
                  "13b": "TPU v5 lite:8x16", "70b": "TPU v5 lite:16x16"}


def recorded_fit(size: str) -> tuple[str, dict]:
  """(the command that records `size`'s fit, its report in benchmarks/results/fit-<size>.json)."""
  topology = SMALLEST_SLICE[size]
  path = f"benchmarks/results/fit-{size}.json"
  command = (f"python -m foundation.compile --config configs/lm.py:size={size} "
             f"--topology {shlex.quote(topology)} --json {path}")
  with open(os.path.join(ROOT, path)) as f:
    return command, json.load(f)


@pytest.mark.parametrize("size", SMALLEST_SLICE)
def test_a_large_size_defaults_are_the_ones_recorded_to_fit_its_smallest_slice(size):
  # Compiling a 7b step takes minutes, so the suite checks the record instead: the defaults
  # (nothing overridden but the topology) were compiled for the slice, fitted, and are still the
  # defaults. Changing one in configs/lm.py without re-running that command fails here.
  command, report = recorded_fit(size)
  assert report["command"] == command, f"re-run: {command}"
  assert report["fits"] is True and report["bytes"]["total"] <= report["hbm_bytes"], report
  config = lm.get_config(f"size={size}")
  assert {k: report[k] for k in ("batch_size", "seq_len", "grad_accum", "remat_policy",
                                 "logits_chunk")} == {
      "batch_size": config.batch_size, "seq_len": config.seq_len,
      "grad_accum": config.grad_accum, "remat_policy": config.model.remat_policy,
      "logits_chunk": config.model.logits_chunk}, f"defaults changed since; re-run: {command}"
  mcfg = transformer.ModelConfig.from_config(config.model)
  input_table = 0 if mcfg.tie_embeddings else mcfg.vocab_size * mcfg.d_model  # else counted once
  assert report["params"] == transformer.non_embedding_params(mcfg) + input_table, "model changed"
  # The defaults validate on the slice's chips as they are (fsdp=-1 fills the slice) and resolve
  # to the mesh that was compiled.
  chips = [types.SimpleNamespace(platform="tpu", slice_index=0, process_index=0)
           ] * report["devices"]
  config_lib.validate(config, chips, process_count=1)
  assert mesh_lib.mesh_shape(config.mesh, chips)[0] == report["mesh"]
  assert lm.FIT_DEFAULTS[size][0] == report["topology"]  # the config names the same slice


def test_a_large_size_defaults_validate_on_every_slice_docs_scaling_names_for_it():
  # Each micro-batch must split over the data-parallel ways of the bigger slices too, so that the
  # defaults start there (with fewer rows per chip); docs/scaling.md names the one exception.
  documented_override = {("70b", 512): {"grad_accum": 16}}
  for path in glob.glob(os.path.join(ROOT, "benchmarks", "fit", "*.json")):
    with open(path) as f:
      report = json.load(f)
    config = lm.get_config(f"size={report['size']}").unlock()
    config.update(documented_override.get((report["size"], report["devices"]), {}))
    chips = [types.SimpleNamespace(platform="tpu", slice_index=0, process_index=0)
             ] * report["devices"]
    config_lib.validate(config, chips, process_count=1)


def test_fit_check_for_a_vit(tmp_path):
  """The fit check is the family's and task's own: a ViT, its image batch and FLOPs per image."""
  report_file = tmp_path / "fit.json"
  result = subprocess.run(
      [tpu_python(), "-m", "foundation.compile", "--config", "configs/vit.py:size=test",
       "--topology", "v5p:2x2x1", "--json", str(report_file)],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT, "TPU_WORKER_HOSTNAMES": "localhost", "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "batch 32 x 16 patches" in result.stdout and "fits: " in result.stdout
  report = json.loads(report_file.read_text())
  from configs import vit as vit_configs  # pylint: disable=g-import-not-at-top
  from foundation.models import vit  # pylint: disable=g-import-not-at-top
  config = vit_configs.get_config("size=test")
  cfg = vit.ViTConfig.from_config(config.model)
  assert report["fits"] is True and report["unit"] == "patches"
  assert report["params"] == vit.count_params(cfg, 32)
  assert report["model_flops_per_step"] == pytest.approx(32 * vit.flops_per_example(cfg, 32))
