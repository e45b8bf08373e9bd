"""The speed bench, its PyTorch peer, the loss-curve check and launch/gpu_env.sh, on the CPU.

Speed is never asserted: only that each command runs and records what it measured, with the
fields the GPU session's table is made of.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from foundation import bench
from foundation import config as config_lib
from foundation import step as step_lib
from foundation.models import layers
from foundation.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
  """benchmarks/NAME.py as a module (its flags are defined only when it runs as a command)."""
  spec = importlib.util.spec_from_file_location(
      f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_command_records_speed_device_and_command(tmp_path):
  out = tmp_path / "bench.json"
  peer = bench.torch_importable()
  command = [sys.executable, "-m", "foundation.bench", "--config", "configs/lm.py:size=test",
             "--steps", "3", "--warmup", "1", "--profile", "1", "--json", str(out),
             "--peer", "--nopeer_compile", "--rounds", "2"]
  # without torch the record says why the peer was skipped
  # One CPU device (not the tests' eight): the sharded step is the trainer's, tested there.
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["command"] == ("python -m foundation.bench --config configs/lm.py:size=test --steps 3 "
                          f"--warmup 1 --profile 1 --json {out} --peer --nopeer_compile "
                          f"--rounds 2")
  assert r["command"] in result.stdout and "tokens/s" in result.stdout
  assert r["platform"] == "cpu" and r["devices"] == 1 and r["jax"] and r["xla_flags"] == ""
  assert r["fits"] is True and r["loss"]["finite"]
  s = r["step_time"]
  assert s["n"] == 6 and 0 < s["p10"] <= s["median"] <= s["p90"] and s["pipelined_mean"] > 0
  assert len(r["rounds"]) == 2 and all(len(x["loadavg_after"]) == 3 for x in r["rounds"])
  config = lm.get_config("size=test")
  tokens = config.batch_size * config.seq_len
  mcfg = transformer.ModelConfig.from_config(config.model)
  assert r["flops_per_step"]["palm"] == transformer.flops_per_token(mcfg, config.seq_len) * tokens
  assert 0 < r["flops_per_step"]["causal"] < r["flops_per_step"]["palm"]
  assert r["tokens_per_sec"] == pytest.approx(tokens / s["median"])
  assert r["tflops_per_device"]["palm"] > r["tflops_per_device"]["causal"] > 0
  assert r["mfu"] is None  # no data-sheet peak for a CPU; the measured ceiling stands in
  assert r["ceilings"]["matmul"]["tflops"] > 0 and r["ceilings"]["copy"]["gbps"] > 0
  assert r["mfu_of_matmul_ceiling"]["palm"] > 0
  breakdown = r["breakdown"]["ms_per_step"]  # the traced step's time by part of the model
  assert breakdown["MLP"] > 0 and breakdown["attention projections"] > 0
  assert breakdown["optimizer and update (clip, AdamW)"] > 0
  assert breakdown and r["breakdown"]["top_ops"][0]["ms"] > 0
  if peer:  # same shape, so the same number of parameters; the ratio is JAX's over the peer's,
    # alternated with it: the median over rounds of the ratio of runs timed back to back
    assert r["peer"]["framework"] == "torch" and r["peer"]["params"] == r["params"]
    ratios = [x["tokens_per_sec"] / x["peer_tokens_per_sec"] for x in r["rounds"]]
    assert r["ratio"] == pytest.approx(np.median(ratios))
    assert len(r["peer"]["tokens_per_sec_rounds"]) == 2 and "round 2: jax" in result.stdout
  else:
    assert "torch" in r["peer"]["skipped"]
  table = subprocess.run([sys.executable, "benchmarks/render_results.py", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
  assert table.returncode == 0, table.stderr
  assert "| test | cpu | xla, scan on" in table.stdout and r["command"] in table.stdout
  assert "breakdown test" in table.stdout


def test_bench_refuses_cudnn_attention_without_a_gpu():
  config = lm.get_config("size=test").copy_and_resolve_references()
  config.model.attention = "cudnn"
  with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn' needs an NVIDIA GPU"):
    bench.check_devices(config, jax.devices())


def test_a_model_too_big_for_the_memory_is_an_answer():
  config = lm.get_config("size=test")
  # Smaller than the train state: refused before compiling.
  r = bench.bench(config, 1, 0, measure_ceilings=False, memory_limit=1000)
  assert r["fits"] is False and "the train state (params and Adam moments) needs" in r["error"]
  assert r["params"] > 0 and "step_time" not in r
  # Room for the state, not for the step: refused on the compiler's estimate, before running.
  limit = r["state_bytes_per_device"] + 1
  r = bench.bench(config, 1, 0, measure_ceilings=False, memory_limit=limit)
  assert r["fits"] is False and "the compiled step (the compiler's estimate)" in r["error"]
  assert r["memory_estimate_bytes"] > limit
  assert "does not fit: the compiled step" in bench.format_report({**r, "command": "x"})


def test_rates_against_the_peak_and_the_measured_ceiling():
  r = bench.rates(0.5, 1000, {"palm": 4e12, "causal": 2e12}, 2, peak_flops=8e12,
                  matmul_tflops=2.0)
  assert r["tokens_per_sec"] == 2000
  assert r["tflops_per_device"] == {"palm": 4.0, "causal": 2.0}
  assert r["mfu"] == {"palm": 0.5, "causal": 0.25}
  assert r["mfu_of_matmul_ceiling"] == {"palm": 2.0, "causal": 1.0}


def test_config_args_are_what_the_peer_is_given():
  argv = ["--config", "configs/lm.py:size=1b", "--steps", "9", "--config.batch_size=8",
          "--config.model.attention", "cudnn", "--peer", "--noconfig.model.scan_layers"]
  assert bench.config_args(argv) == ["--config", "configs/lm.py:size=1b", "--config.batch_size=8",
                                     "--config.model.attention", "cudnn",
                                     "--noconfig.model.scan_layers"]


def test_gpu_env_flags_exist_in_this_jaxlib_and_keep_yours():
  source = ". launch/gpu_env.sh && printf %s \"$XLA_FLAGS\""
  env = {**os.environ, "FOUNDATION_GPUS": "8", "XLA_FLAGS": ""}
  flags = subprocess.run(["bash", "-c", source], cwd=ROOT, capture_output=True, text=True,
                         env=env, check=True).stdout
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert "--xla_gpu_enable_pipelined_all_gather=true" in flags  # more than one GPU
  # XLA aborts at start-up on a flag it does not know: every one must start this jaxlib.
  start_jax = "import jax; jax.numpy.zeros(1).block_until_ready()"
  start = subprocess.run([sys.executable, "-c", start_jax],
                         env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
  assert start.returncode == 0, start.stderr[-2000:]
  env = {**os.environ, "FOUNDATION_GPUS": "1",
         "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
  twice = subprocess.run(["bash", "-c", f"{source}; {source}"], cwd=ROOT, capture_output=True,
                         text=True, env=env, check=True).stdout
  assert twice == "--xla_gpu_enable_latency_hiding_scheduler=false" * 2


def test_apply_gpu_env_copies_what_the_script_sets(tmp_path, monkeypatch):
  script = tmp_path / "env.sh"
  script.write_text('export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false"\n'
                    'export UNRELATED_TO_XLA=1\n')
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  changed = bench.apply_gpu_env(str(script))
  assert changed == {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"}
  assert os.environ["XLA_FLAGS"] == changed["XLA_FLAGS"] and "UNRELATED_TO_XLA" not in os.environ


def test_packed_batches_exercise_segments_positions_and_padding():
  curve = load_script("loss_curve")
  batch = curve.packed_batches(0, 1, 8, 64, 384)[0]
  assert all(v.shape == (8, 64) and v.dtype == np.int32 for v in batch.values())
  padded = batch["loss_mask"] == 0
  assert padded[0, -1] and not padded[1].any()  # every fourth row ends in padding
  assert (batch["segment_ids"][padded] == 0).all() and (batch["inputs"][padded] == 0).all()
  starts = batch["inputs"] == curve.BOS
  assert (batch["positions"][starts] == 0).all() and (batch["segment_ids"][1].max() > 1)


def test_loss_curves_agree_for_equivalent_paths_and_catch_a_masking_leak(monkeypatch):
  curve = load_script("loss_curve")
  base = curve.squeezed_schedule(lm.get_config("size=test"), 3)
  batches = curve.packed_batches(0, 3, base.batch_size, base.seq_len, base.model.vocab_size)
  reference, start = curve.run(base, batches)
  # Per-layer blocks: another program, the same function, from the same params relaid out.
  unrolled = curve.with_overrides(base, ["model.scan_layers=false"])
  same, unrolled_start = curve.run(unrolled, batches, start)
  assert "layers" in start and "layers" not in unrolled_start
  np.testing.assert_array_equal(unrolled_start["layers_1"]["attn"]["q"]["kernel"],
                                start["layers"]["attn"]["q"]["kernel"][1])
  comparison = curve.compare(reference, same)
  assert comparison["finite"] and comparison["max_rel_diff"] < curve.default_rtol(base, unrolled)
  # The bug a fused-attention fast path risks: attending across documents and to padding.
  length = base.seq_len
  monkeypatch.setattr(layers, "attention_mask", lambda segment_ids, *_, **__: jnp.broadcast_to(
      jnp.tril(jnp.ones((length, length), bool)), (segment_ids.shape[0], 1, length, length)))
  leaky, _ = curve.run(base, batches, start)
  assert curve.compare(reference, leaky)["max_rel_diff"] > 10 * curve.default_rtol(base)


def test_config_overrides_are_checked_by_field_and_type():
  curve = load_script("loss_curve")
  base = lm.get_config("size=test")
  assert curve.with_overrides(base, ["model.attention=cudnn"]).model.attention == "cudnn"
  with pytest.raises(config_lib.ConfigError, match="model.scan_layer=false"):
    curve.with_overrides(base, ["model.scan_layer=false"])
  with pytest.raises(config_lib.ConfigError, match="model.scan_layers=maybe"):
    curve.with_overrides(base, ["model.scan_layers=maybe"])


@pytest.mark.parametrize("tied", [False, True])
def test_peer_model_has_our_parameter_count(tied):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import torch
  peer = load_script("peer_torch")
  config = lm.get_config("size=test").copy_and_resolve_references()
  config.model.tie_embeddings = tied
  model = peer.build_model(config, torch.device("cpu"), torch.float32)
  ours = step_lib.make_model(config)
  params = jax.eval_shape(ours.init, jax.random.key(0), *step_lib._dummy_inputs(config))
  assert sum(p.numel() for p in model.parameters()) == transformer.count_params(params)
