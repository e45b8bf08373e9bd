"""Synthetic data: random tokens from per-step seeds, in numpy only.

For benchmarks and for machines without TensorFlow (GPU images): this module must not import it.
The batch at step s depends only on (seed, stream, process, s), so the iterator state is the step
counter and resuming is exact by construction.
"""

import json

from etils import epath
import numpy as np

from foundation.data import iterators

FIRST_TOKEN_ID = 3  # ids below are pad, bos, eos: never sampled
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def synthetic_batch(seed: int, stream: int, process_index: int, step: int, host_batch: int,
                    seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
  """One host batch of uniform tokens in [3, vocab_size); int32 [host_batch, seq_len] each."""
  rng = np.random.default_rng([seed, stream, process_index, step])
  tokens = rng.integers(FIRST_TOKEN_ID, vocab_size, size=(host_batch, seq_len + 1), dtype=np.int32)
  ones = np.ones((host_batch, seq_len), np.int32)
  return {
      "inputs": np.ascontiguousarray(tokens[:, :-1]),
      "targets": np.ascontiguousarray(tokens[:, 1:]),
      "segment_ids": ones,  # one document per row
      "positions": np.tile(np.arange(seq_len, dtype=np.int32), (host_batch, 1)),
      "loss_mask": ones.copy(),
  }


class SyntheticIterator(iterators.DataIterator):
  """Endless synthetic host batches; the state is the step counter, saved as JSON."""

  def __init__(self, *, seed: int, host_batch: int, seq_len: int, vocab_size: int,
               process_index: int, process_count: int):
    self.seed, self.host_batch = seed, host_batch
    self.seq_len, self.vocab_size = seq_len, vocab_size
    self.process_index, self.process_count = process_index, process_count
    self.step = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = synthetic_batch(self.seed, _TRAIN_STREAM, self.process_index, self.step,
                            self.host_batch, self.seq_len, self.vocab_size)
    self.step += 1
    return batch

  def save(self, directory: str) -> None:
    path = epath.Path(self._prefix(directory) + ".json")
    path.write_text(json.dumps({"step": self.step}))

  def restore(self, directory: str) -> None:
    path = epath.Path(self._prefix(directory) + ".json")
    if not path.exists():
      found = [p.name for p in epath.Path(directory).iterdir()]
      raise iterators.missing_state_error(directory, self._prefix(directory), found)
    self.step = int(json.loads(path.read_text())["step"])


def synthetic_eval_batches(*, seed: int, steps: int, host_batch: int, seq_len: int, vocab_size: int,
                           process_index: int) -> list[dict[str, np.ndarray]]:
  """`steps` fixed host batches from a seed stream the train iterator never draws from."""
  return [synthetic_batch(seed, _EVAL_STREAM, process_index, step, host_batch, seq_len, vocab_size)
          for step in range(steps)]
