"""Reading prepared data (`python -m foundation.data.prepare`): numpy only, no TensorFlow.

A prepared folder holds, per split, the token stream of its documents — [bos] + ids for each
document, end to end, and one bos after the last — cut into .npy shards (uint16, or uint32 for
vocabularies past 65,536), plus manifest.json (shards, token and document counts, the tokenizer's
sha256, a fingerprint) and a copy of the tokenizer's files (tokenizers.files) when it has any.

Rows are windows of seq_len + 1 stream tokens at multiples of seq_len (packing.stream_rows turns
them into inputs/targets/starts), so any seq_len can read the same folder. Train rows come in a
fresh random order each epoch — a keyed Feistel permutation of the row numbers, so the order
needs no memory and no state — and the global train position is one integer: the number of rows
of the (mixed) order consumed. Host p of P takes rows [p*b, (p+1)*b) of each global batch of P*b.
The position does not depend on the host count or the batch size, so a run resumes exactly on any
number of hosts.
"""

import hashlib
import json
import os

from etils import epath
import numpy as np

from foundation.data import iterators
from foundation.data import mixture
from foundation.data import packing
from foundation.data import sources

MANIFEST = "manifest.json"
FORMAT = "foundation.prepared/1"
_FEISTEL_ROUNDS = 4


def manifest_path(directory: str) -> str:
  return os.path.join(directory, MANIFEST)


def load_manifest(source: sources.Source) -> dict:
  """The manifest of a 'prepared:DIR' source; clear errors for a folder that is not one."""
  directory = source.arg
  if "://" in directory:
    raise ValueError(f"{source.where}: prepared data is read by memory-mapping; copy or mount "
                     f"(e.g. gcsfuse) {directory} to a local path")
  path = manifest_path(directory)
  if not os.path.isfile(path):
    found = sorted(os.listdir(directory))[:10] if os.path.isdir(directory) else "no such folder"
    raise ValueError(f"{source.where}: no {MANIFEST} in {directory} ({found}); write one with "
                     f"python -m foundation.data.prepare --output {directory}")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{source.where}: {path} has format {manifest.get('format')!r}, this version "
                     f"reads {FORMAT!r}; prepare the data again")
  return manifest


def fingerprint(splits: dict, tokenizer_sha: str) -> str:
  """sha256 over the tokenizer and every shard's sha256: names the data exactly."""
  digest = hashlib.sha256(tokenizer_sha.encode())
  for name in sorted(splits):
    for shard in splits[name]["shards"]:
      digest.update(f"{name}/{shard['file']}/{shard['length']}/{shard['sha256']}".encode())
  return digest.hexdigest()


class PreparedSplit:
  """One split's stream: its shards memory-mapped as one virtual array."""

  def __init__(self, directory: str, entry: dict):
    self.directory = directory
    self.files = [os.path.join(directory, s["file"]) for s in entry["shards"]]
    self.offsets = np.concatenate([[0], np.cumsum([s["length"] for s in entry["shards"]])])
    self.tokens = int(entry["tokens"])  # real tokens; the stream holds one more (the last bos)
    self._shards = [None] * len(self.files)

  def _shard(self, i: int) -> np.ndarray:
    if self._shards[i] is None:
      self._shards[i] = np.load(self.files[i], mmap_mode="r")
    return self._shards[i]

  def slice(self, start: int, stop: int) -> np.ndarray:
    """stream[start:stop], across shard boundaries when needed."""
    first = int(np.searchsorted(self.offsets, start, side="right")) - 1
    if stop <= self.offsets[first + 1]:  # the common case: inside one shard
      base = self.offsets[first]
      return self._shard(first)[start - base:stop - base]
    pieces, i = [], first
    while start < stop:
      end = min(stop, self.offsets[i + 1])
      pieces.append(self._shard(i)[start - self.offsets[i]:end - self.offsets[i]])
      start, i = end, i + 1
    return np.concatenate(pieces)

  def rows(self, seq_len: int) -> int:
    """Complete rows of seq_len tokens (the train split drops the last incomplete one)."""
    return self.tokens // seq_len

  def windows(self, rows: np.ndarray, seq_len: int) -> np.ndarray:
    """[len(rows), seq_len + 1] stream windows of complete rows `rows`."""
    return np.stack([self.slice(int(r) * seq_len, int(r) * seq_len + seq_len + 1) for r in rows])


# ---------------------------------------------------------------- a stateless shuffle

def _round_function(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """A 64-bit mix (splitmix64's finaliser) of x ^ key; uint64 arithmetic wraps."""
  x = x ^ key
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permute(indices: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
  """A keyed bijection of [0, n) applied to `indices`: a Feistel network on the smallest even
  number of bits that covers n, cycle-walked back into range (fewer than 4 rounds on average)."""
  indices = np.asarray(indices, np.uint64)
  if n <= 1:
    return indices.astype(np.int64)
  bits = max(2, int(n - 1).bit_length())
  bits += bits % 2
  half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)

  def encrypt(x):
    left, right = x >> half, x & mask
    for key in keys:
      left, right = right, left ^ (_round_function(right, key) & mask)
    return (left << half) | right

  out = encrypt(indices)
  outside = out >= n
  while outside.any():
    out[outside] = encrypt(out[outside])
    outside = out >= n
  return out.astype(np.int64)


def epoch_keys(seed: int, source_index: int, epoch: int) -> np.ndarray:
  return np.random.SeedSequence([seed, source_index, epoch]).generate_state(
      _FEISTEL_ROUNDS, np.uint64)


def shuffled_rows(positions: np.ndarray, num_rows: int, seed: int, source_index: int) -> np.ndarray:
  """Row numbers at `positions` of a source's endless order: each epoch a fresh permutation."""
  epochs, within = np.divmod(np.asarray(positions, np.int64), num_rows)
  rows = np.empty_like(within)
  for epoch in np.unique(epochs):
    chosen = epochs == epoch
    rows[chosen] = permute(within[chosen], num_rows, epoch_keys(seed, source_index, int(epoch)))
  return rows


# ---------------------------------------------------------------- the sources of a run

class PreparedData:
  """The prepared sources of a run (one, or a mixture), checked against the config."""

  def __init__(self, config, sources_: list[sources.Source], tokenizer):
    self.sources = sources_
    self.counts = mixture.slot_counts([s.weight for s in sources_])
    self.manifests = [load_manifest(s) for s in sources_]
    self.seq_len, self.seed = config.seq_len, config.seed
    self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id
    self.vocab_size = config.model.vocab_size
    for source, manifest in zip(sources_, self.manifests):
      _check_manifest(config, source, manifest, tokenizer)
    self.fingerprints = [m["fingerprint"] for m in self.manifests]

  def split(self, index: int, name: str) -> PreparedSplit | None:
    entry = self.manifests[index]["splits"].get(name)
    return PreparedSplit(self.sources[index].arg, entry) if entry and entry["tokens"] else None

  def train_splits(self) -> list[PreparedSplit]:
    splits = []
    for i, source in enumerate(self.sources):
      split = self.split(i, "train")
      entry = self.manifests[i]["splits"].get("train") or {}
      documents = entry.get("documents")
      if documents and entry.get("tokens", 0) <= documents:  # one bos per document, no text
        raise ValueError(f"{source.where}: no text to train on: the train split holds "
                         f"{documents} document(s) and no tokens besides their BOS (were the "
                         f"prepared documents empty?)")
      if split is None or split.rows(self.seq_len) == 0:
        tokens = split.tokens if split else 0
        raise ValueError(f"{source.where}: the train split holds {tokens} tokens, not one row of "
                         f"seq_len={self.seq_len}")
      splits.append(split)
    return splits


def _check_manifest(config, source: sources.Source, manifest: dict, tokenizer) -> None:
  """The data was made with this run's tokenizer, and its ids fit the model's embedding."""
  from foundation.data import tokenizers  # pylint: disable=g-import-not-at-top
  made_with = manifest["tokenizer"]
  ours = tokenizers.fingerprint(tokenizer)
  if (made_with["kind"], made_with["sha256"]) != (ours["kind"], ours["sha256"]):
    stored = (f"--config.data.tokenizer={os.path.join(source.arg, made_with['file'])}"
              if made_with.get("file") else "--config.data.tokenizer=byte")
    raise ValueError(
        f"data.tokenizer={config.data.tokenizer!r} ({tokenizers.describe(ours)}) is not the "
        f"tokenizer {source.where} was prepared with ({tokenizers.describe(made_with)}); train "
        f"with {stored}")
  if manifest["max_id"] >= config.model.vocab_size:
    raise ValueError(
        f"{source.where} holds token id {manifest['max_id']}, beyond model.vocab_size="
        f"{config.model.vocab_size}; raise model.vocab_size to at least {manifest['max_id'] + 1}")


# ---------------------------------------------------------------- the train iterator

class PreparedIterator(iterators.DataIterator):
  """Host batches of prepared rows; the state is the global position (rows consumed)."""

  def __init__(self, data: PreparedData, host_batch: int, process_index: int,
               process_count: int, description: dict):
    self.data, self.host_batch = data, host_batch
    self.process_index, self.process_count = process_index, process_count
    self.splits = data.train_splits()
    self.num_rows = [s.rows(data.seq_len) for s in self.splits]
    self.position = 0
    self._description = description

  def __next__(self) -> dict[str, np.ndarray]:
    d = self.data
    start = self.position + self.process_index * self.host_batch
    source, within = mixture.locate(np.arange(start, start + self.host_batch), d.counts)
    windows = np.empty((self.host_batch, d.seq_len + 1), np.int64)
    for k in np.unique(source):
      chosen = source == k
      rows = shuffled_rows(within[chosen], self.num_rows[k], d.seed, int(k))
      windows[chosen] = self.splits[k].windows(rows, d.seq_len)
    if windows.max() >= d.vocab_size:  # a damaged shard must not index past the embedding
      raise iterators.input_error(f"prepared data holds token id {windows.max()} >= model.vocab_size="
                       f"{d.vocab_size} (rows at global position {start})")
    self.position += self.host_batch * self.process_count
    return packing.finish_rows(**packing.stream_rows(windows, d.bos_id, d.eos_id))

  def _state(self) -> dict:
    return {"position": self.position, "fingerprints": self.data.fingerprints,
            "seed": self.data.seed, "seq_len": self.data.seq_len,
            "sources": [s.spec for s in self.data.sources],
            "slots": [int(c) for c in self.data.counts]}

  def save(self, directory: str) -> None:
    epath.Path(self._prefix(directory) + ".json").write_text(json.dumps(self._state()))

  def restore(self, directory: str) -> None:
    """Reads this process's state, or any process's: the position is global, so a checkpoint
    written by another host count continues exactly (no row repeated or skipped)."""
    folder = epath.Path(directory)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    own = os.path.basename(self._prefix(directory)) + ".json"
    saved = [n for n in found if n.startswith("process_") and n.endswith(".json")]
    name = own if own in found else (saved[0] if saved else None)
    if name is None:
      raise iterators.missing_state_error(directory, self._prefix(directory), found)
    state = json.loads((folder / name).read_text())
    ours = self._state()
    for key in ("fingerprints", "seed", "seq_len", "slots"):
      if state.get(key) != ours[key]:
        raise ValueError(
            f"the checkpoint's data position is for other prepared data or settings ({key}: "
            f"saved {state.get(key)}, now {ours[key]}; sources then {state.get('sources')}): "
            f"resuming would repeat or skip rows; use the same data.source/data.mixture, seed and "
            f"seq_len, or start a new workdir")
    self.position = int(state["position"])

  def description(self) -> dict:
    shares = mixture.rows_before(self.position, self.data.counts)
    return {**self._description, "position": self.position,
            "rows_per_source": [int(r) for r in shares]}

  def metrics(self) -> dict[str, float]:
    return mixture.shares(self.data.sources, mixture.rows_before(self.position, self.data.counts))


# ---------------------------------------------------------------- eval rows

def eval_rows(data: PreparedData, limit: int) -> list[dict[str, np.ndarray]]:
  """The first `limit` eval rows of the (mixed) order, in order, the same on every host. Each
  source's last row may be short; the order stops when a source runs out."""
  splits = [data.split(i, "eval") for i in range(len(data.sources))]
  for split, source in zip(splits, data.sources):
    if split is None:
      raise ValueError(f"{source.where}: the prepared data has no eval split (it was prepared "
                       f"with data.eval_fraction=0 or an empty eval split); set eval.every=0")
  rows, L = [], data.seq_len
  source, within = mixture.locate(np.arange(limit), data.counts)
  for k, j in zip(source, within):
    split = splits[k]
    start = int(j) * L
    if start >= split.tokens:
      break
    window = split.slice(start, min(start + L, split.tokens) + 1)
    rows.append(packing.stream_rows(window[None].astype(np.int64), data.bos_id, data.eos_id))
    rows[-1] = {name: value[0] for name, value in rows[-1].items()}
  return rows
