"""Checkpoints: Orbax CheckpointManager over the train state, the data iterator and run metadata.

Layout of a workdir:
  config.json                   the run's config (written once, at start)
  checkpoints/<step>/state/     params + optimizer state + step (Orbax, sharded arrays)
  checkpoints/<step>/data/      each process's input-iterator position (process_<i>of<n>.*)
  checkpoints/<step>/meta/      JSON: step, versions, time; `data`: the sources, the tokenizer's
                                sha256, vocab, seq_len and host count behind the data position
Orbax writes a step to a temporary folder and renames it when every process has finished, so only
complete checkpoints are ever visible; `latest_step()` sees only those.
"""

import dataclasses
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


# ---------------------------------------------------------------- the data-iterator item
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any  # anything with .save(directory) and .restore(directory)


@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves each process's iterator state into the item folder (each process its own files).

  The save is synchronous on purpose: it must capture the iterator position at the step being
  saved, before training moves it on.
  """

  def save(self, directory: epath.Path, args: DataIteratorSave):
    args.iterator.save(os.fspath(directory))

  def restore(self, directory: epath.Path, args: DataIteratorRestore):
    args.iterator.restore(os.fspath(directory))
    return args.iterator


ocp.args.register_with_handler(DataIteratorHandler, for_save=True)(DataIteratorSave)
ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)(DataIteratorRestore)


# ---------------------------------------------------------------- the manager
def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)  # Orbax needs absolute paths; users type relative ones
  return ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.checkpoint.keep,
          enable_async_checkpointing=config.checkpoint.async_save,
          create=True),
      item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "data": DataIteratorHandler(),
          "meta": ocp.JsonCheckpointHandler(),
      })


def run_metadata(step: int, data_iterator=None) -> dict:
  meta = {"step": int(step), "time": time.time(), "jax": jax.__version__,
          "process_count": jax.process_count(), "device_count": jax.device_count()}
  if hasattr(data_iterator, "description"):
    # What the data position belongs to; data.check_resume compares it before a restore.
    meta["data"] = data_iterator.description()
  return meta


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  """Starts an (async) save of the state and the iterator position after `step` steps."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=DataIteratorSave(data_iterator),
      meta=ocp.args.JsonSave(run_metadata(step, data_iterator))))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores `step` straight into the shardings that `abstract_state` carries.

  abstract_state: a tree of jax.ShapeDtypeStruct with `sharding` set. A given data iterator is
  moved to the saved position in place. Returns the restored state.
  """
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = DataIteratorRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The metadata JSON saved with `step` (no arrays are read)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def write_config(workdir: str, config) -> None:
  """config.json beside the checkpoints: what this run was, readable without the project."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
