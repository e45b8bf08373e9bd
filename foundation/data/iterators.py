"""The iterator interface the trainer and the checkpointer use, where its state lives, and the
checks that a saved position fits the run resuming from it.

Every process saves only its own position, into a file named for it, so all processes can write into
one shared checkpoint folder at once. A per-host tf.data position belongs to one host's share of
the data and cannot be re-split: resuming it on another process count is refused, with the way
out in the message. Prepared-data and global tf.data positions (see pipeline.py) are the same on
every host and resume on any process count.
"""

import json
import os
import re

import numpy as np

_STATE_FILE = re.compile(r"process_(\d+)of(\d+)\.")
# Positions that are one global position, the same on every host: they resume on any host count.
GLOBAL_POSITIONS = ("prepared", "tf.data-global", "sft", "classify", "image", "global")


def state_prefix(directory: str, process_index: int, process_count: int) -> str:
  """Path prefix of one process's iterator state: DIR/process_<i>of<n>."""
  return os.path.join(directory, f"process_{process_index}of{process_count}")


def input_error(message: str) -> ValueError:
  """The error for bad input met while training (a malformed line, a damaged shard): a
  foundation.config.ConfigError, which the trainer prints as one line, as it does the same
  error met while setting up. (Imported here, lazily: foundation.config imports JAX.)"""
  from foundation import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.ConfigError(message)


def host_count_error(saved_count: int, process_count: int, source: str, where: str) -> ValueError:
  return ValueError(
      f"{where} holds the input position of {saved_count} process(es), but this run has "
      f"{process_count}: the on-the-fly input ({source}) gives each host its own share of the "
      f"documents, so its position cannot be re-split over another host count without repeating "
      f"or skipping data. Resume with {saved_count} process(es), or train from prepared data "
      f"(python -m foundation.data.prepare; its position carries over to any host count), or start "
      f"a new workdir")


def missing_state_error(directory: str, prefix: str, found: list[str],
                        source: str = "") -> ValueError:
  counts = {int(m.group(2)) for m in map(_STATE_FILE.match, found) if m}
  process_count = int(_STATE_FILE.match(os.path.basename(prefix) + ".").group(2))
  if counts and process_count not in counts:
    return host_count_error(min(counts), process_count, source or "this data source",
                            f"the checkpoint folder {directory}")
  return ValueError(
      f"no data-iterator state {os.path.basename(prefix)}.* in {directory} (it holds "
      f"{sorted(found)[:10]}): was it saved by another process count or data source?")


class DataIterator:
  """Endless host batches: dicts of numpy int32 arrays, each [host_batch, seq_len], keyed
  inputs, targets, segment_ids, positions, loss_mask.

  save(directory) writes this process's position into `directory` (which exists);
  restore(directory) moves this iterator there, after which it yields exactly the batches the
  saved iterator would have yielded next. description() is JSON for the checkpoint's metadata
  (what data and tokenizer made this position); metrics() the realised share of each source.
  """

  process_index: int
  process_count: int
  _description: dict = {}

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def save(self, directory: str) -> None:
    raise NotImplementedError

  def restore(self, directory: str) -> None:
    raise NotImplementedError

  def description(self) -> dict:
    return dict(self._description)

  def metrics(self) -> dict[str, float]:
    return {}

  def _prefix(self, directory: str) -> str:
    return state_prefix(directory, self.process_index, self.process_count)


class TfDataIterator(DataIterator):
  """A DataIterator over a tf.data iterator (`self._iterator`) whose position is tf.data's own
  checkpoint, with the count of batches taken (`self.steps`) beside it. Subclasses build the
  dataset and set `_iterator`, `_description`, `steps` and the process fields."""

  _iterator = None
  steps = 0

  def save(self, directory: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = self._prefix(directory)
    tf.train.Checkpoint(iterator=self._iterator).write(prefix)
    with tf.io.gfile.GFile(prefix + ".json", "w") as f:
      f.write(json.dumps({"steps": self.steps, "process_count": self.process_count}))

  def restore(self, directory: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + ".index"):
      found = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
      raise missing_state_error(directory, prefix, found, self._description["sources"][0][0])
    tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
    with tf.io.gfile.GFile(prefix + ".json") as f:
      self.steps = json.loads(f.read())["steps"]

  def description(self) -> dict:
    return {**self._description, "steps": self.steps}


def check_resume(saved: dict | None, current: dict, step: int) -> None:
  """Raises ValueError when the checkpoint at `step` (its metadata's data description `saved`)
  was made with another tokenizer, vocabulary, seq_len, data, or host count than this run has
  (`current`), where resuming would be wrong or would repeat or skip data. Old checkpoints
  without a description pass."""
  if not saved:
    return
  where = f"the checkpoint at step {step}"
  if "tokenizer" not in current:  # an input without text (images): its sources and position
    # kind must match (the iterator's own restore refuses a position saved with other settings)
    keys = ["sources", "position_kind"]
    if current.get("position_kind") not in GLOBAL_POSITIONS:
      keys.append("process_count")
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    if changed:
      raise ValueError(f"the input differs from {where}'s in {', '.join(changed)} (then "
                       f"{ {k: saved.get(k) for k in changed} }, now "
                       f"{ {k: current.get(k) for k in changed} }): its position means nothing "
                       f"for this input; resume with the same data.* fields and host count, or "
                       f"start a new workdir")
    return
  then, now = saved.get("tokenizer", {}), current["tokenizer"]
  if (then.get("kind"), then.get("sha256")) != (now["kind"], now["sha256"]):
    hint = (f"--config.data.tokenizer=WORKDIR/{then.get('file')}" if then.get("file")
            else f"--config.data.tokenizer={then.get('name')!r}")
    from foundation.data import tokenizers  # pylint: disable=g-import-not-at-top
    raise ValueError(
        f"data.tokenizer={now['name']!r} ({tokenizers.describe(now)}) is not the tokenizer "
        f"{where} was trained with ({tokenizers.describe(then)}); resume with {hint}, or start a "
        f"new workdir")
  for key, field in (("model_vocab_size", "model.vocab_size"), ("seq_len", "seq_len")):
    if saved.get(key) is not None and saved[key] != current[key]:
      raise ValueError(f"{field}={current[key]} but {where} was trained with {saved[key]}; "
                       f"resume with --config.{field}={saved[key]} or start a new workdir")
  if saved.get("sources") != current["sources"]:
    raise ValueError(
        f"the data differs from {where}'s (then {saved.get('sources')}, now "
        f"{current['sources']}): its input position means nothing for other data; resume with the "
        f"same data.source/data.mixture or start a new workdir")
  kinds = saved.get("position_kind"), current["position_kind"]
  if kinds[0] != kinds[1]:
    raise ValueError(
        f"{where} read its input as {kinds[0]!r}, this run as {kinds[1]!r} (the host count or "
        f"the number of files changed how hosts share the data): its position cannot be carried "
        f"over; resume with {saved.get('process_count')} process(es) and the same files, or start "
        f"a new workdir")
  if kinds[0] not in GLOBAL_POSITIONS and saved.get("process_count") != current["process_count"]:
    raise host_count_error(saved.get("process_count"), current["process_count"],
                           ", ".join(s for s, _ in current["sources"]), where)
