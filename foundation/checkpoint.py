"""Checkpoints: Orbax CheckpointManager over the train state, the data iterator and run metadata.

Layout of a workdir:
  config.json                   the run's config (written once, at start)
  checkpoints/<step>/state/     params + optimizer state + step (Orbax, sharded arrays)
  checkpoints/<step>/data/      each process's input-iterator position (process_<i>of<n>.*)
  checkpoints/<step>/meta/      JSON: step, versions, time; `data`: the sources, the tokenizer's
                                sha256, vocab, seq_len and host count behind the data position
Orbax writes a step to a temporary folder (`<step>.orbax-checkpoint-tmp`) and renames it when
every process has finished, so only complete checkpoints are ever visible; `latest_step()` sees only
those, and the manager deletes leftover temporary folders when it starts. Nothing is pickled: arrays
are tensorstore (OCDBT), the rest JSON, the tf.data position TensorFlow's checkpoint format.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
import ml_collections
from jax.experimental import multihost_utils

from foundation import workdir as workdir_lib

TMP_SUFFIX = ".orbax-checkpoint-tmp"


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
def checkpoints_dir(workdir: str) -> epath.Path:
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)  # Orbax needs absolute paths; users type relative ones
  return epath.Path(workdir) / "checkpoints"


def check_workdir(workdir: str) -> None:
  """Raises ValueError (one line) when `workdir` is a file, lies under a file, or cannot be
  written: before any compile, and without creating anything (the probe file is deleted)."""
  if "://" in workdir:
    return  # a bucket: its own errors name it
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir {workdir} is a file, not a folder: give a folder (one that does "
                     f"not exist yet is created)")
  existing = path
  while not os.path.exists(existing):  # the nearest folder that exists: where it will be made
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--workdir {workdir} cannot be created: {existing} is a file, not a folder")
  try:
    with tempfile.TemporaryFile(dir=existing, prefix=".foundation-write-test-"):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir} is not writable: {existing}: [Errno {e.errno}] "
                     f"{e.strerror}") from None


def incomplete_saves(workdir: str) -> list[str]:
  """Temporary folders of saves that never finished (a kill mid-save); the manager deletes them."""
  directory = checkpoints_dir(workdir)
  if not directory.exists():
    return []
  return sorted(p.name for p in directory.iterdir() if TMP_SUFFIX in p.name)


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  for logger in ("absl", "asyncio"):  # save_failed says it in one line
    logging.getLogger(logger).addFilter(_QUIET_ORBAX_ERRORS)
  if not getattr(sys.unraisablehook, "quiet", False):
    sys.unraisablehook = _quiet_late_callbacks(sys.unraisablehook)
  return ocp.CheckpointManager(
      checkpoints_dir(workdir),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.checkpoint.keep,
          enable_async_checkpointing=config.checkpoint.async_save,
          cleanup_tmp_directories=True,
          create=False),  # the first save makes the folder: a refused start leaves none
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


# sysexits.h EX_IOERR: a checkpoint could not be written (disk full, permission denied, a quota).
EXIT_SAVE_FAILED = 74


class SaveFailed(Exception):
  """A checkpoint save failed; the message names the folder, the OS error and the last good one."""


_STARTED = weakref.WeakKeyDictionary()  # manager -> the step of its newest started save


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  """Starts an (async) save of the state and the iterator position after `step` steps.

  Raises SaveFailed when it cannot start (the previous save failed, or the synchronous part,
  the input position, cannot be written)."""
  wait_for_saves(manager)  # the previous save's failure is reported as that step's
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataIteratorSave(data_iterator),
        meta=ocp.args.JsonSave(run_metadata(step, data_iterator))))
  except Exception as e:  # pylint: disable=broad-except
    raise save_failed(manager, step, e) from None
  _STARTED[manager] = step


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises SaveFailed as soon as a finished async save turns out to have failed. Cheap enough
  for every step: while a save is being written it returns at once, without waiting."""
  if not manager.is_saving_in_progress():
    wait_for_saves(manager)


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for a started save to commit; raises SaveFailed when it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise save_failed(manager, _STARTED.get(manager), e) from None


def os_error(error: Exception) -> str:
  """The operating system's words for why a write failed, e.g. '[Errno 28] No space left on
  device'; else the error's first line."""
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.errno:
      return f"[Errno {e.errno}] {e.strerror}"
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore's
  if code:
    return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  # TensorFlow's and others' messages end with the C library's words: find them.
  named = [(len(os.strerror(n)), n) for n in range(1, 134) if os.strerror(n) in text]
  if named:
    n = max(named)[1]
    return f"[Errno {n}] {os.strerror(n)}"
  text = text.splitlines()[0] if text else ""
  return f"{type(error).__name__}: {text[:300]}"


def save_failed(manager: ocp.CheckpointManager, step, error: Exception) -> SaveFailed:
  last = manager.latest_step()
  kept = (f"the last good checkpoint, step {last}, is kept: {manager.directory / str(last)}"
          if last is not None else "there is no checkpoint yet")
  return SaveFailed(
      f"the checkpoint save at step {step} failed ({manager.directory / str(step)}: "
      f"{os_error(error)}); {kept}. Free disk space or fix the folder's permissions, then run "
      f"the same command again to resume (exit code {EXIT_SAVE_FAILED})")


class _QuietOrbaxErrors(logging.Filter):
  """Drops Orbax's own ERROR records (tracebacks from its background threads), and asyncio's
  'exception was never retrieved' about a checkpoint's writes: the trainer reports each failed
  save or read itself, in one line."""

  def filter(self, record):
    if record.levelno < logging.ERROR:
      return True
    if f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    return not (record.name == "asyncio" and TMP_SUFFIX in record.getMessage())


_QUIET_ORBAX_ERRORS = _QuietOrbaxErrors()


def _quiet_late_callbacks(hook):
  """sys.unraisablehook without the 'Event loop is closed' RuntimeErrors that tensorstore's write
  callbacks report, one traceback per array, when Orbax has already given up on a failed save."""
  def unraisablehook(unraisable):
    if not (unraisable.exc_type is RuntimeError and
            str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  unraisablehook.quiet = True
  return unraisablehook


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores `step` straight into the shardings that `abstract_state` carries.

  abstract_state: a tree of jax.ShapeDtypeStruct with `sharding` set. A given data iterator is
  moved to the saved position in place. Returns the restored state.
  """
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = DataIteratorRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_data(manager: ocp.CheckpointManager, step: int, data_iterator) -> None:
  """Moves `data_iterator` to the input position saved with `step`, in place."""
  manager.restore(step, args=ocp.args.Composite(data=DataIteratorRestore(data_iterator)))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The metadata JSON saved with `step` (no arrays are read)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def write_config(workdir: str, config) -> None:
  """config.json beside the checkpoints: what this run was, readable without the project."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  # Files kept in the workdir (its tokenizer copy) are named relative to it: the folder can move.
  portable = workdir_lib.portable(config.to_dict(), workdir)
  path.write_text(json.dumps(portable, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- restoring, with fallbacks
def has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
  return (manager.directory / str(step) / item).exists()


def restore_latest(manager: ocp.CheckpointManager, abstract_state, data_iterator, say,
                   check=lambda step, meta: None):
  """(state, step, meta) from the newest checkpoint that restores; (None, None, None) when there
  is none.

  A checkpoint any part of which fails to read (its meta JSON, the state arrays, the input
  position: a missing, truncated, garbled or corrupted file) is moved to
  WORKDIR/corrupt_checkpoints/ with a line naming the file and why, and the next older one is
  tried: the run loses the steps since that one, never the whole run, and never trains on garbage
  silently. `say` prints a line for the user; `check(step, meta)` may refuse a readable checkpoint
  (ValueError: another tokenizer or data) before its arrays are read: a refusal, not corruption.
  """
  while (step := manager.latest_step()) is not None:
    folder = manager.directory / str(step)
    try:
      meta = read_meta(manager, step)
      if not isinstance(meta, dict) or meta.get("step") != step:
        raise ValueError(f"it holds {str(meta)[:100]!r}, not this step's metadata")
    except Exception as e:  # pylint: disable=broad-except
      set_aside(manager, step, folder / "meta" / "metadata", e, say)
      continue
    if not has_item(manager, step, "data") and "imported_from" in meta:
      # An imported model (python -m foundation.hf import) has no input position to resume.
      raise ValueError(
          f"{manager.directory}/0 holds imported weights, not a training run: fine-tune or "
          f"continue pre-training in a new workdir with "
          f"--config.init_from={manager.directory.parent}")
    check(step, meta)
    try:
      state = restore(manager, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, (ValueError, KeyError)) and "shape" in str(e).lower():
        raise  # a config that does not match the checkpoint: not corruption
      set_aside(manager, step, folder / "state", e, say)
      continue
    if data_iterator is not None:
      try:
        restore_data(manager, step, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        set_aside(manager, step, folder / "data", e, say)
        continue
    return state, step, meta
  return None, None, None


def set_aside(manager: ocp.CheckpointManager, step: int, part, error: Exception, say) -> None:
  """Quarantines checkpoint `step`, whose `part` (a file or item folder) could not be read, with
  one line naming it and the error."""
  text = str(error).splitlines()[0][:300] if str(error) else ""
  moved = quarantine(manager, step)
  say(f"WARNING: the checkpoint at step {step} could not be read ({part}: "
      f"{type(error).__name__}: {text}); moved it to {moved} and trying the one before it")


def quarantine(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoints/<step> aside (process 0), so that it is neither resumed nor overwritten."""
  target = manager.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(manager.directory / str(step)), os.fspath(target))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
  manager.reload()
  return os.fspath(target)


def resolve_init_from(path: str) -> tuple[epath.Path, int]:
  """(checkpoints folder, step) for --config.init_from: a workdir (its latest checkpoint), its
  checkpoints/ folder, or one checkpoints/<step> folder."""
  p = epath.Path(os.path.abspath(path) if "://" not in path else path)
  if p.name.isdigit() and (p / "state").exists():
    return p.parent, int(p.name)
  folder = p if p.name == "checkpoints" else p / "checkpoints"
  steps = sorted(int(c.name) for c in folder.iterdir() if c.name.isdigit()) if folder.exists() else []
  if not steps:
    raise ValueError(f"init_from={path!r} holds no complete checkpoint (looked for "
                     f"{folder}/<step>/state); give a workdir or a checkpoints/<step> folder")
  return folder, steps[-1]


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree) -> dict[str, Any]:
  return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(path: str, target, partial: bool = False, expected=lambda key: False,
                skip=lambda key: False, group: str = ""):
  """(params, description): the params of the checkpoint at `path` (see resolve_init_from),
  restored straight into `target`'s shardings (a tree of jax.ShapeDtypeStruct).

  The optimizer state on disk is never read. Names or shapes that differ are an error listing
  them, unless `partial`: then the params that match are loaded and the others are returned as
  None leaves for the caller to fill, and listed. `expected(key)` names differences that are
  no error (a fine-tuning model's new adapters or head); those are left to init too. `skip(key)`
  names params never loaded, whatever is on disk (`init_from_skip`: a new head). `group`
  ('image', 'a/b'): read only that group of the checkpoint's params, as if it were the whole
  tree (a two-tower run's image tower into a vlm's image/).
  """
  folder, step = resolve_init_from(path)
  nest = [k for k in group.split("/") if k]
  handler = ocp.PyTreeCheckpointHandler()
  saved = handler.metadata(folder / str(step) / "state").tree
  if "params" not in saved:
    raise ValueError(f"{folder}/{step}/state has no 'params' (items: {sorted(saved)})")
  on_disk_tree = saved["params"]
  for depth, key in enumerate(nest):
    if not isinstance(on_disk_tree, dict) or key not in on_disk_tree:
      groups = sorted(on_disk_tree) if isinstance(on_disk_tree, dict) else []
      raise ValueError(f"init_from={path!r}: its params have no group "
                       f"{'/'.join(nest[:depth + 1])!r} (there: {', '.join(groups) or 'none'})")
    on_disk_tree = on_disk_tree[key]
  on_disk = {k: tuple(v.shape) for k, v in _flat(on_disk_tree).items()}
  wanted = {k: tuple(v.shape) for k, v in _flat(target).items()}
  missing = sorted(k for k in set(wanted) - set(on_disk) if not (expected(k) or skip(k)))
  unexpected = sorted(k for k in set(on_disk) - set(wanted) if not (expected(k) or skip(k)))
  reshaped = sorted(k for k in set(wanted) & set(on_disk)
                    if wanted[k] != on_disk[k] and not skip(k))
  problems = ([f"not in the checkpoint: {', '.join(missing)}"] if missing else []) + (
      [f"only in the checkpoint: {', '.join(unexpected)}"] if unexpected else []) + (
      [f"shapes differ: " + ", ".join(f"{k} {on_disk[k]} on disk vs {wanted[k]} here"
                                      for k in reshaped)] if reshaped else [])
  if problems and not partial:
    source = f"{path}:{group}" if nest else path
    raise ValueError(f"init_from={source!r} (step {step}) does not match this model's params; "
                     + "; ".join(problems) + ". Set --config.init_from_partial=True to load the "
                     "matching ones and initialise the rest")
  load = {k for k in wanted if k in on_disk and wanted[k] == on_disk[k] and not skip(k)}
  item = {"params": _only(target, load)}
  for key in reversed(nest):
    item["params"] = {key: item["params"]}
  manager = ocp.CheckpointManager(folder, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))["state"]["params"]
  manager.close()
  for key in nest:
    restored = restored[key]
  note = f"{folder}/{step}{':' + group if nest else ''}: {len(load)} of {len(wanted)} param arrays"
  new = sorted(k for k in set(wanted) - load if expected(k) or skip(k))
  if new:
    note += f" ({len(new)} new, initialised: {', '.join(new[:6])}{', ...' if len(new) > 6 else ''})"
  if problems:
    note += " (" + "; ".join(problems) + ")"
  return _fill(target, restored), note


def _only(tree: dict, keys: set[str], prefix: str = "") -> dict:
  """The nested-dict subtree of `tree` whose flattened keys are in `keys`."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _only(v, keys, f"{prefix}{k}/")
      if sub:
        out[k] = sub
    elif f"{prefix}{k}" in keys:
      out[k] = v
  return out


def _fill(target: dict, loaded: dict) -> dict:
  """`target`'s structure with the loaded arrays, None where nothing was loaded."""
  return {k: (_fill(v, loaded.get(k, {})) if isinstance(v, dict) else loaded.get(k))
          for k, v in target.items()}



# ---------------------------------------------------------------- the same run, or another
# Fields that may differ when a workdir is resumed: how long, where, how it is laid out and
# watched. Anything else (model, data, optimizer, batch, seed) would make the resumed run another
# run; docs/reliability.md lists these.
RESUMABLE_FIELDS = ("steps", "mesh.", "grad_accum", "model.remat_policy", "model.logits_chunk",
                    "model.attention", "checkpoint.", "eval.", "evaluate.", "log.", "profile.",
                    "guard.", "resume", "init_from", "data.prefetch", "data.tfds_data_dir")


def _flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))  # tuples -> lists, as on disk
  return out


def config_differences(saved: dict, config) -> list[str]:
  """'field: saved -> now' for each field that differs and may not change on resume."""
  then, now = _flat_config(saved), _flat_config(config.to_dict())
  changed = []
  for field in sorted(set(then) | set(now)):
    if field.startswith(RESUMABLE_FIELDS) or then.get(field) == now.get(field):
      continue
    changed.append(f"{field}: {then.get(field, '(absent)')!r} -> {now.get(field, '(absent)')!r}")
  return changed


def check_same_run(workdir: str, config, say=print) -> None:
  """Refuses to resume a workdir that another config wrote (its config.json), naming the fields.

  A config.json that cannot be read (garbled, truncated) is moved to corrupt_checkpoints/ with a
  warning, like a damaged checkpoint: this run writes it again; the checkpoints' own metadata
  still refuses other data or another tokenizer, and their shapes another model.
  """
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
      raise ValueError(f"it holds a {type(saved).__name__}, not a config")
  except (OSError, UnicodeDecodeError, ValueError) as e:
    target = path.parent / "corrupt_checkpoints" / f"config.json-{int(time.time())}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(os.fspath(path), os.fspath(target))
    say(f"WARNING: {path} could not be read ({type(e).__name__}: {str(e)[:200]}); moved it to "
        f"{target}; the config is checked against the checkpoints' metadata only")
    return
  saved = workdir_lib.portable(saved, workdir)  # paths compared as stored
  changed = config_differences(saved, ml_collections.ConfigDict(
      workdir_lib.portable(config.to_dict(), workdir)))
  if changed:
    raise ValueError(
        f"{workdir} was written by another config; these fields differ from its config.json: "
        + "; ".join(changed[:12]) + (f"; and {len(changed) - 12} more" if len(changed) > 12
                                    else "")
        + ". Use a new --workdir, or set the fields back (fields that may change on resume: "
        + ", ".join(RESUMABLE_FIELDS) + ")")
