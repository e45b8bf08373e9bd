"""Tokenizers: bytes (no training, 259 ids) and SentencePiece models.

Both share one id layout so the packing code never asks which one it has:
pad=0, bos=1, eos=2 (and SentencePiece's unk=3). `encode` never adds bos/eos: packing does.

Each tokenizer also has `tf_encode(text) -> int32 [n]` for use inside a tf.data map. TensorFlow is
imported only there, so the Python side works on machines without it (GPU images).

A run keeps its SentencePiece model as WORKDIR/tokenizer.model and each checkpoint records the
tokenizer's sha256 (`fingerprint`), so a resume or a prepared folder with another tokenizer is a
clear error instead of a model reading the wrong ids.
"""

import hashlib
import os

import numpy as np

from foundation.data import sources

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # byte b has id b + 3: the ids below it are pad, bos, eos.


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: b -> b + 3; vocab_size 259."""

  vocab_size = 256 + BYTE_OFFSET
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  # A pure graph op: an iterator holding it can be checkpointed without any external-state waiver.
  has_external_state = False

  def encode(self, text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    """Drops pad/bos/eos (and ids past the vocabulary); invalid UTF-8 becomes U+FFFD."""
    data = bytes(int(i) - BYTE_OFFSET for i in ids if BYTE_OFFSET <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def tf_encode(self, text):
    """tf.string scalar -> int32 [num_bytes]."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32) + BYTE_OFFSET


class SentencePieceTokenizer:
  """A SentencePiece model trained by `python -m foundation.tokenizer` (pad=0, bos=1, eos=2, unk=3).

  Inside tf.data it runs through `tf.py_function`: tensorflow-text's in-graph SentencePiece op
  requires the full `tensorflow` package (we install tensorflow-cpu). The pipeline therefore
  declares the py_function's state ignorable when checkpointing (encoding is a pure function).
  """

  has_external_state = True

  def __init__(self, model_proto: bytes, path: str = ""):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = path
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    specials = {"pad": (self._sp.pad_id(), PAD_ID), "bos": (self._sp.bos_id(), BOS_ID),
                "eos": (self._sp.eos_id(), EOS_ID)}
    wrong = {name: got for name, (got, want) in specials.items() if got != want}
    if wrong:
      raise ValueError(
          f"SentencePiece model {path!r} has special ids {wrong}; foundation needs pad=0, bos=1, "
          f"eos=2: train it with `python -m foundation.tokenizer`")
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    """Drops pad/bos/eos and out-of-range ids; byte pieces that are not UTF-8 become U+FFFD."""
    keep = [int(i) for i in ids if int(i) > EOS_ID and int(i) < self.vocab_size]
    # Decoding to pieces then bytes never raises, unlike decode_ids on a broken byte sequence.
    return self._sp.decode_ids(keep) if keep else ""

  def _encode_bytes(self, text):
    ids = self._sp.encode(text.numpy().decode("utf-8", errors="replace"))
    # An array, not a list: py_function would read an empty list as "no outputs".
    return np.asarray(ids, dtype=np.int32)

  def tf_encode(self, text):
    """tf.string scalar -> int32 [num_pieces], through tf.py_function."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    ids = tf.py_function(self._encode_bytes, [text], tf.int32)
    ids.set_shape([None])
    return ids

  def _encode_batch(self, texts):
    pieces = self._sp.encode([t.decode("utf-8", errors="replace") for t in texts.numpy()])
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    flat = np.fromiter((i for p in pieces for i in p), np.int32, int(lengths.sum()))
    return flat, lengths

  def tf_encode_batch(self, texts):
    """tf.string [n] -> int32 RaggedTensor [n, None]: one tf.py_function call for n documents."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    flat, lengths = tf.py_function(self._encode_batch, [texts], [tf.int32, tf.int64])
    return tf.RaggedTensor.from_row_lengths(tf.ensure_shape(flat, [None]),
                                            tf.ensure_shape(lengths, [None]))


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def _path_exists(path: str) -> bool:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.exists(path)
  return os.path.isfile(path)


def make_tokenizer(name: str) -> Tokenizer:
  """'byte' -> ByteTokenizer; anything else is the path of a SentencePiece .model file."""
  if name == "byte":
    return ByteTokenizer()
  if not name or not _path_exists(name):
    raise ValueError(
        f"data.tokenizer={name!r}: no such SentencePiece model file. Use 'byte', or train one: "
        f"python -m foundation.tokenizer --config configs/lm.py:size=tiny --vocab_size 1000 "
        f"--output DIR/sp.model")
  return SentencePieceTokenizer(sources.read_file(name), path=name)


def check_vocab_size(tokenizer: Tokenizer, config) -> None:
  """Raises ValueError when the tokenizer emits ids the model's embedding has no row for."""
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f"the tokenizer data.tokenizer={config.data.tokenizer!r} has vocab_size "
        f"{tokenizer.vocab_size}, more than model.vocab_size={config.model.vocab_size}: raise "
        f"--config.model.vocab_size to at least {tokenizer.vocab_size} or use a smaller tokenizer")


WORKDIR_FILE = "tokenizer.model"


def fingerprint(tokenizer: Tokenizer, name: str = "") -> dict:
  """JSON naming a tokenizer exactly: kind, vocab_size, sha256 of the model (None for bytes)."""
  if isinstance(tokenizer, ByteTokenizer):
    return {"kind": "byte", "name": name or "byte", "vocab_size": tokenizer.vocab_size,
            "sha256": None, "file": None}
  return {"kind": "sentencepiece", "name": name or tokenizer.path,
          "vocab_size": tokenizer.vocab_size,
          "sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(), "file": WORKDIR_FILE}


def describe(fp: dict) -> str:
  """'sentencepiece, vocab 8000, sha256 0123456789ab' or 'byte, vocab 259' for a fingerprint."""
  sha = f", sha256 {fp['sha256'][:12]}" if fp.get("sha256") else ""
  return f"{fp.get('kind')}, vocab {fp.get('vocab_size')}{sha}"


def _has_checkpoints(workdir) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def store_tokenizer(tokenizer: Tokenizer, name: str, workdir: str, write: bool) -> None:
  """Keeps the run's SentencePiece model as WORKDIR/tokenizer.model (written when `write`, on one
  process, atomically). Once checkpoints exist the file belongs to them: another tokenizer is
  then an error, and the file is never replaced. Before that, it is simply replaced."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  path = workdir / WORKDIR_FILE
  ours = fingerprint(tokenizer, name)
  stored_sha = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
  if stored_sha == ours["sha256"]:
    return
  if _has_checkpoints(workdir):
    if stored_sha is not None:
      raise ValueError(
          f"data.tokenizer={name!r} ({describe(ours)}) is not the tokenizer of this workdir's "
          f"checkpoints, {path} (sha256 {stored_sha[:12]}): use --config.data.tokenizer={path}, "
          f"or a new --workdir")
    return  # an older run without the file: the checkpoints' metadata still has the sha256
  if not write:
    return
  if ours["kind"] == "byte":
    path.unlink(missing_ok=True)  # left by a run that never checkpointed
    return
  workdir.mkdir(parents=True, exist_ok=True)
  partial = workdir / f".{WORKDIR_FILE}.partial"
  partial.write_bytes(tokenizer.model_proto)
  partial.replace(path)  # atomic, and replaces a file no checkpoint depends on
