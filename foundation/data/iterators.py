"""The iterator interface the trainer and the checkpointer use, and where its state lives.

Every process saves only its own position, into a file named for it, so all processes can write into
one shared checkpoint folder at once and a restore on another process count fails loudly.
"""

import os

import numpy as np


def state_prefix(directory: str, process_index: int, process_count: int) -> str:
  """Path prefix of one process's iterator state: DIR/process_<i>of<n>."""
  return os.path.join(directory, f"process_{process_index}of{process_count}")


def missing_state_error(directory: str, prefix: str, found: list[str]) -> ValueError:
  return ValueError(
      f"no data-iterator state {os.path.basename(prefix)}.* in {directory} (it holds "
      f"{sorted(found)[:10]}): was it saved by another process count or data source?")


class DataIterator:
  """Endless host batches: dicts of numpy int32 arrays, each [host_batch, seq_len], keyed
  inputs, targets, segment_ids, positions, loss_mask.

  save(directory) writes this process's position into `directory` (which exists);
  restore(directory) moves this iterator there, after which it yields exactly the batches the
  saved iterator would have yielded next.
  """

  process_index: int
  process_count: int

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def save(self, directory: str) -> None:
    raise NotImplementedError

  def restore(self, directory: str) -> None:
    raise NotImplementedError

  def _prefix(self, directory: str) -> str:
    return state_prefix(directory, self.process_index, self.process_count)
