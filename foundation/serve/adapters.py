"""LoRA fine-tunes of the served base, from one process (--adapters NAME=WORKDIR,...).

Each WORKDIR is a LoRA run of the same base (configs/finetune.py:...,lora with init_from the
served workdir). Only its adapter leaves (lora_a, lora_b beside each targeted kernel; a few
percent of the params) are read from its checkpoint and kept; the base params are held once.
A request whose `model` names an adapter is decoded with lora.merge(lora.attach(base, adapter))
computed inside the jitted step (a transient copy of the targeted kernels, as training does),
so no merged copy of the base is ever stored.
"""

import dataclasses
import os
import sys

from foundation import build as build_lib
from foundation import generate as generate_lib
from foundation import lora
from foundation.models import transformer


@dataclasses.dataclass
class Adapter:
  name: str
  workdir: str
  params: dict        # the adapter leaves only, nested as in the model's params
  alpha: float
  config: object      # the run's config (its chat template: an SFT run's)
  step: int


def _model_mismatch(base_cfg, cfg) -> str | None:
  for field in dataclasses.fields(transformer.ModelConfig):
    if field.name.startswith("lora"):
      continue
    a, b = getattr(base_cfg, field.name), getattr(cfg, field.name)
    if a != b:
      return f"model.{field.name}={b} (the base has {a})"
  return None


def load(session, base_workdir: str, name: str, workdir: str) -> Adapter:
  where = f"--adapters {name}={workdir}"
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise ValueError(f"{where}: no config.json there (a LoRA run's workdir)")
  config = generate_lib.load_config(workdir)
  if not lora.enabled(config):
    raise ValueError(f"{where}: not a LoRA run (lora.rank=0); serve a full fine-tune with its "
                     f"own --workdir")
  if config.model.get("num_classes", 0):
    raise ValueError(f"{where}: a classifier (model.num_classes={config.model.num_classes}) "
                     f"has labels, not text to serve")
  built = build_lib.build(config, mesh=session.mesh)
  mismatch = _model_mismatch(session.model.cfg, built.model.cfg)
  if mismatch:
    raise ValueError(f"{where}: not a fine-tune of this base: {mismatch}")
  init_from = config.get("init_from", "")
  base_dir = os.path.realpath(base_workdir)
  if init_from and os.path.realpath(str(init_from)).rstrip("/") != base_dir.rstrip("/"):
    print(f"{where}: its run started from {init_from}, not the served {base_dir}; serving it "
          f"over this base as the shapes match", file=sys.stderr)
  target = lora.adapters(built.abstract_state["params"])
  params, step = generate_lib.restore_params(workdir, target)
  return Adapter(name, workdir, params, float(config.lora.alpha), config, step)


def load_all(session, base_workdir: str, adapters: dict[str, str]):
  """{name: workdir} -> ({name: (adapter params, alpha)} for the engine, {name: config})."""
  loaded = [load(session, base_workdir, name, workdir) for name, workdir in adapters.items()]
  for a in loaded:
    print(f"adapter {a.name!r}: {a.workdir} step {a.step}, "
          f"{sum(x.size for x in _leaves(a.params)):,} adapter params, lora.alpha={a.alpha:g}",
          flush=True)
  return ({a.name: (a.params, a.alpha) for a in loaded}, {a.name: a.config for a in loaded})


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)
