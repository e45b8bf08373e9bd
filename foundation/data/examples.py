"""In-memory example datasets for fine-tuning (SFT, classification): reading records with their
file:line, a stable train/eval split, the epoch-ordered iterator, and host-count-free eval batches.

Fine-tuning sets are small (thousands to a few million examples), so every host reads and
tokenizes all of them once, in numpy, without TensorFlow. A dataset is a list of examples and a
`plan(epoch)`: the rows of that epoch, each a tuple of example indices (one example per row for
classification, several packed ones for SFT). The endless stream is epoch 0's rows, then epoch
1's, ...; global batch k is rows [k*B, (k+1)*B) of it and host p of P takes rows
[p*b, (p+1)*b) of each (b = B / P). The position -- (epoch, row) -- is therefore the same on every
host and for every host count or batch size: a restored iterator continues exactly, on any number
of hosts.

Shuffles are keyed Feistel permutations of the example indices (prepared.permute): the same on
every machine and numpy version.
"""

import dataclasses
import hashlib
import json
import math
import os
import zlib
from typing import Any, Callable

from etils import epath
import numpy as np

from foundation.data import iterators
from foundation.data import prepared
from foundation.data import sources

Rows = list[tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Record:
  """One input record: its parsed value and where it came from ('file.jsonl:12')."""
  where: str
  value: Any
  hash: float  # a stable number in [0, 1) of the raw record: the train/eval split


def record_hash(raw: bytes) -> float:
  """A stable number in [0, 1) per record: crc32 is the same on every machine and run."""
  return zlib.crc32(raw) / 2**32


def glob_paths(pattern: str, field: str) -> list[str]:
  """Sorted files matching `pattern`; the error names the config field."""
  return sources.glob_files(pattern, f"{field}={pattern!r}")[1]


def read_jsonl(paths: list[str]) -> list[Record]:
  """Every non-blank line of every file, parsed; a line that is not JSON is an error naming it."""
  records = []
  for path in paths:
    for number, line in enumerate(sources.read_file(path).splitlines(), start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        value = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = getattr(e, "msg", "not UTF-8")
        raise ValueError(f"{where} is not a JSON line ({reason}): {line[:80]!r}") from None
      records.append(Record(where, value, record_hash(line)))
  return records


def data_sha256(paths: list[str]) -> str:
  """sha256 over the files' names and bytes: the data a saved position belongs to."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(os.path.basename(path).encode() + b"\0" + sources.read_file(path) + b"\0")
  return digest.hexdigest()


def hash_split(records: list, eval_fraction: float, where: str) -> tuple[list, list]:
  """(train, eval) by each record's hash: a record is held out when its hash < eval_fraction.

  A pure function of the records (the same on every host and run). When the fraction holds out
  nothing from two or more records, the smallest hash is held out, so small sets still evaluate.
  """
  held = [r.hash < eval_fraction for r in records]
  if eval_fraction > 0 and not any(held) and len(records) >= 2:
    held[min(range(len(records)), key=lambda i: records[i].hash)] = True
  train = [r for r, h in zip(records, held) if not h]
  if not train:
    raise ValueError(f"{where}: no train examples left after holding out eval_fraction="
                     f"{eval_fraction} of {len(records)}; lower it or give an eval file")
  return train, [r for r, h in zip(records, held) if h]


def shuffled(count: int, seed: int, stream: int, epoch: int) -> np.ndarray:
  """int64 [count]: a permutation of range(count), fixed by (seed, stream, epoch)."""
  return prepared.permute(np.arange(count), count, prepared.epoch_keys(seed, stream, epoch))


def next_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> Rows:
  """Packs examples, in `order`, into rows of at most `capacity` tokens: each example goes into
  the current row when it fits, else opens the next. Keeps the shuffled order (no sorting by
  length), so consecutive batches stay mixed; every example lands in exactly one row."""
  rows, row, used = [], [], 0
  for i in order.tolist():
    n = int(lengths[i])
    if row and used + n > capacity:
      rows.append(tuple(row))
      row, used = [], 0
    row.append(i)
    used += n
  if row:
    rows.append(tuple(row))
  return rows


class EpochIterator(iterators.DataIterator):
  """Endless host batches over `plan(epoch)` rows; the state is the global (epoch, row).

  build(rows) -> dict of int32 numpy arrays, one entry per row (the batch). `identity` (JSON) names
  the data and settings the position belongs to; restoring a position saved with another identity
  is a clear error.
  """

  def __init__(self, plan: Callable[[int], Rows], build: Callable[[Rows], dict],
               global_batch: int, process_index: int, process_count: int, identity: dict,
               description: dict):
    if global_batch % process_count:
      raise ValueError(f"batch_size={global_batch} (global) is not divisible by the process "
                       f"count {process_count}: each host must load an equal share")
    self.plan, self.build = plan, build
    self.global_batch, self.host_batch = global_batch, global_batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self.identity, self._description = identity, description
    self.epoch, self.row = 0, 0
    self._plans: dict[int, Rows] = {}

  def _rows(self, epoch: int) -> Rows:
    if epoch not in self._plans:
      self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}  # keep two
      self._plans[epoch] = self.plan(epoch)
    return self._plans[epoch]

  def _take(self, epoch: int, row: int, count: int) -> tuple[Rows, int, int]:
    """`count` rows of the stream from (epoch, row); returns them and the position after."""
    taken = []
    while len(taken) < count:
      rows = self._rows(epoch)
      piece = rows[row:row + count - len(taken)]
      taken.extend(piece)
      row += len(piece)
      if row >= len(rows):
        epoch, row = epoch + 1, 0
    return taken, epoch, row

  def __next__(self) -> dict[str, np.ndarray]:
    # Every host walks the same global batch and keeps its slice.
    rows, epoch, row = self._take(self.epoch, self.row, self.global_batch)
    first = self.process_index * self.host_batch
    batch = self.build(rows[first:first + self.host_batch])
    self.epoch, self.row = epoch, row
    return batch

  def _state(self) -> dict:
    return {"epoch": self.epoch, "row": self.row, **self.identity}

  def save(self, directory: str) -> None:
    epath.Path(self._prefix(directory) + ".json").write_text(json.dumps(self._state()))

  def restore(self, directory: str) -> None:
    """Reads this process's state, or any process's: the position is global."""
    folder = epath.Path(directory)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    own = os.path.basename(self._prefix(directory)) + ".json"
    saved = [n for n in found if n.startswith("process_") and n.endswith(".json")]
    name = own if own in found else (saved[0] if saved else None)
    if name is None:
      raise iterators.missing_state_error(directory, self._prefix(directory), found)
    state = json.loads((folder / name).read_text())
    for key, ours in self.identity.items():
      if state.get(key) != ours:
        raise ValueError(
            f"the checkpoint's data position belongs to other data or settings ({key}: saved "
            f"{state.get(key)!r}, now {ours!r}): resuming would repeat or skip examples; use the "
            f"same data files, seed, seq_len and tokenizer, or start a new workdir")
    self.epoch, self.row = int(state["epoch"]), int(state["row"])

  def description(self) -> dict:
    return {**self._description, "epoch": self.epoch, "row": self.row}

  def metrics(self) -> dict[str, float]:
    """Epochs done so far (fractional): fine-tuning runs are measured in epochs."""
    return {"data/epochs": self.epoch + self.row / max(len(self._rows(self.epoch)), 1)}


def eval_batches(rows: Rows, build: Callable[[Rows], dict], config, process_index: int,
                 process_count: int) -> list[dict[str, np.ndarray]]:
  """This host's share of at most eval.steps batches over `rows` (in order, the same on every
  host): the last batch padded with empty rows (all-zero masks), host p taking its slice of each.
  The union over hosts is the same rows for any host count, so summed metrics do not depend on it.
  """
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} (global) is not divisible by the process "
                     f"count {process_count}: each host must load an equal share")
  host_batch = config.batch_size // process_count
  rows = rows[:config.eval.steps * config.batch_size]
  steps = math.ceil(len(rows) / config.batch_size)
  padded = rows + [()] * (steps * config.batch_size - len(rows))
  first = process_index * host_batch
  return [build(padded[s * config.batch_size + first:s * config.batch_size + first + host_batch])
          for s in range(steps)]
