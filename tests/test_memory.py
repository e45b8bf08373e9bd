"""Memory levers lower per-device memory in the expected direction (compiled memory analysis).

The train step is compiled ahead of time for the 8 CPU devices (the same code path as the TPU fit
check, `python -m foundation.compile --topology cpu`) and its buffer assignment read back.
"""

import functools

import jax

from configs import lm
from foundation import compile as compile_lib

MiB = 2 ** 20


def medium_config(**changes):
  """Big enough that activations, params and logits each show in the totals; 8-way splittable."""
  config = lm.get_config("size=test")
  with config.unlocked():
    config.model.update(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                        mlp_dim=1024, vocab_size=2048, max_seq_len=512)
    config.seq_len, config.batch_size = 256, 32
    for dotted, value in changes.items():
      group, key = dotted.split("__")
      config[group][key] = value
  return config


@functools.cache
def memory(**changes) -> dict:
  report = compile_lib.fit_report(medium_config(**changes), jax.devices())
  return {k: v / MiB for k, v in report["bytes"].items()}


def test_remat_policies_lower_activation_memory_in_order():
  temps = {policy: memory(model__remat_policy=policy)["temporaries"]
           for policy in ("none", "minimal", "dots", "full")}
  print("temporaries MiB per device by remat policy:", temps)
  assert temps["none"] > temps["minimal"] > temps["dots"] > temps["full"]
  assert temps["full"] < 0.5 * temps["none"]


def test_fsdp_splits_params_and_optimizer_state_eight_ways():
  fsdp, data = memory(mesh__fsdp=8, mesh__data=1), memory(mesh__fsdp=1, mesh__data=8)
  print("fsdp=8:", fsdp, "data=8:", data)
  for kind in ("params", "optimizer_state"):
    assert abs(fsdp[kind] * 8 - data[kind]) < 0.2, kind  # norms are too small to split evenly
  assert fsdp["total"] < data["total"]


def test_chunked_cross_entropy_lowers_memory_for_a_large_vocabulary():
  whole = memory(model__remat_policy="full", model__vocab_size=8192)
  chunked = memory(model__remat_policy="full", model__vocab_size=8192, model__logits_chunk=32)
  print("temporaries MiB, whole logits:", whole["temporaries"], "chunked:", chunked["temporaries"])
  # The float32 [4, 256, 8192] logits of one device are 32 MiB; chunks of 32 positions are 4 MiB.
  assert chunked["temporaries"] < whole["temporaries"] - 8
