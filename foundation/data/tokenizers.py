"""Tokenizers: bytes (no training, 259 ids), SentencePiece models, Hugging Face tokenizer.json.

`data.tokenizer` is 'byte', a SentencePiece `.model` file, or a Hugging Face `tokenizer.json`
(an imported model's, with `tokenizer_config.json` beside it naming its special tokens).
Our own two share one id layout, pad=0, bos=1, eos=2 (and SentencePiece's unk=3); a tokenizer.json
keeps its own ids, so the pipeline always asks the tokenizer for `bos_id`/`eos_id`/`pad_id`.
`encode` never adds bos/eos: packing does.

Each tokenizer also has `tf_encode(text) -> int32 [n]` for use inside a tf.data map. TensorFlow is
imported only there, so the Python side works on machines without it (GPU images).

A run keeps its tokenizer's files in the workdir (WORKDIR/tokenizer.model, or tokenizer.json and
tokenizer_config.json) and each checkpoint records their sha256 (`fingerprint`), so a resume or a
prepared folder with another tokenizer is a clear error instead of a model reading the wrong ids.
"""

import hashlib
import json
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


class InGraphEncoding:
  """tf_encode / tf_encode_batch for a tokenizer that encodes in Python (`encode`, `encode_texts`):
  inside tf.data they run through tf.py_function (so an iterator holding one is checkpointed with
  its external state declared ignorable: encoding is a pure function)."""

  has_external_state = True

  def _encode_bytes(self, text):
    ids = self.encode(text.numpy().decode("utf-8", errors="replace"))
    # An array, not a list: py_function would read an empty list as "no outputs".
    return np.asarray(ids, dtype=np.int32)

  def tf_encode(self, text):
    """tf.string scalar -> int32 [n], through tf.py_function."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    ids = tf.py_function(self._encode_bytes, [text], tf.int32)
    ids.set_shape([None])
    return ids

  def _encode_batch(self, texts):
    pieces = self.encode_texts([t.decode("utf-8", errors="replace") for t in texts.numpy()])
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    flat = np.fromiter((i for p in pieces for i in p), np.int32, int(lengths.sum()))
    return flat, lengths

  def tf_encode_batch(self, texts):
    """tf.string [n] -> int32 RaggedTensor [n, None]: one tf.py_function call for n documents."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    flat, lengths = tf.py_function(self._encode_batch, [texts], [tf.int32, tf.int64])
    return tf.RaggedTensor.from_row_lengths(tf.ensure_shape(flat, [None]),
                                            tf.ensure_shape(lengths, [None]))


class SentencePieceTokenizer(InGraphEncoding):
  """A SentencePiece model trained by `python -m foundation.tokenizer` (pad=0, bos=1, eos=2, unk=3).

  Inside tf.data it runs through `tf.py_function`: tensorflow-text's in-graph SentencePiece op
  requires the full `tensorflow` package (we install tensorflow-cpu). The pipeline therefore
  declares the py_function's state ignorable when checkpointing (encoding is a pure function).
  """

  def __init__(self, model_proto: bytes, path: str = ""):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = path
    self.model_proto = model_proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, TypeError, ValueError) as e:  # sentencepiece's parse failure
      del e  # sentencepiece's text is its C++ source line, not the reason
      raise ValueError(f"data.tokenizer={path!r} is not a SentencePiece model (its "
                       f"{len(model_proto)} bytes do not parse as one); use 'byte', a Hugging "
                       f"Face tokenizer.json or a .model file from `python -m "
                       f"foundation.tokenizer`") from None
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

  def encode_texts(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts)


class HFTokenizer(InGraphEncoding):
  """A Hugging Face tokenizer.json (the `tokenizers` package) behind foundation's tokenizer API.

  `encode` adds no special tokens (packing adds BOS/EOS, as for the others); `decode` drops them.
  The special ids are the file's own: bos/eos/pad named by tokenizer_config.json beside it, else the
  usual token names; without a BOS token (Qwen2) EOS stands in for it, without a pad token EOS.
  """
  NAMES = {"bos": ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"),
           "eos": ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"),
           "pad": ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")}
  SIDECAR = "tokenizer_config.json"

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self.path = path
    self.json_bytes = sources.read_file(path)
    side = os.path.join(os.path.dirname(path), self.SIDECAR)
    self.sidecar_bytes = sources.read_file(side) if _path_exists(side) else None
    try:
      self._tok = Tokenizer.from_str(self.json_bytes.decode("utf-8"))
    except Exception as e:  # the tokenizers package raises its own exception type
      reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
      raise ValueError(f"data.tokenizer={path!r} is not a Hugging Face tokenizer.json: "
                       f"{reason}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = {}
    if self.sidecar_bytes is not None:
      try:
        sidecar = json.loads(self.sidecar_bytes)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{side} (beside data.tokenizer={path!r}) is not JSON ({e}); fix or "
                         f"remove it") from None
      if not isinstance(sidecar, dict):
        raise ValueError(f"{side} (beside data.tokenizer={path!r}) is not a JSON object")
      for kind in self.NAMES:
        token = sidecar.get(f"{kind}_token")
        named[kind] = token.get("content") if isinstance(token, dict) else token
    ids = {kind: self._id(named.get(kind), self.NAMES[kind]) for kind in self.NAMES}
    if ids["eos"] is None:
      raise ValueError(f"{path}: no EOS token found ({self.SIDECAR} eos_token, or one of "
                       f"{self.NAMES['eos']})")
    self.eos_id = ids["eos"]
    self.bos_id = self.eos_id if ids["bos"] is None else ids["bos"]
    self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]

  def _id(self, named: str | None, usual) -> int | None:
    for token in ([named] if named else []) + list(usual):
      if self._tok.token_to_id(token) is not None:
        return self._tok.token_to_id(token)
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Drops special tokens and ids past the vocabulary."""
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self._tok.decode(keep, skip_special_tokens=True)

  def encode_texts(self, texts: list[str]) -> list[list[int]]:
    """Batched, on the tokenizers package's threads."""
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def _path_exists(path: str) -> bool:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.exists(path)
  return os.path.isfile(path)


def make_tokenizer(name: str) -> Tokenizer:
  """'byte' -> ByteTokenizer; a path ending in .json -> HFTokenizer; else a SentencePiece model."""
  if name == "byte":
    return ByteTokenizer()
  if not name or not _path_exists(name):
    raise ValueError(
        f"data.tokenizer={name!r}: no such tokenizer file. Use 'byte', a Hugging Face "
        f"tokenizer.json, or a SentencePiece model; to train one: python -m foundation.tokenizer "
        f"--config configs/lm.py:size=tiny --vocab_size 1000 --output DIR/sp.model")
  if name.endswith(".json"):
    return HFTokenizer(name)
  return SentencePieceTokenizer(sources.read_file(name), path=name)


def check_vocab_size(tokenizer: Tokenizer, config) -> None:
  """Raises ValueError when the tokenizer emits ids the model's embedding has no row for."""
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f"the tokenizer data.tokenizer={config.data.tokenizer!r} has vocab_size "
        f"{tokenizer.vocab_size}, more than model.vocab_size={config.model.vocab_size}: raise "
        f"--config.model.vocab_size to at least {tokenizer.vocab_size} or use a smaller tokenizer")


def files(tokenizer: Tokenizer) -> dict[str, bytes]:
  """{file name: contents} that reproduce the tokenizer (kept in workdirs and prepared folders;
  the first is the one to name as data.tokenizer). None for bytes."""
  if isinstance(tokenizer, SentencePieceTokenizer):
    return {"tokenizer.model": tokenizer.model_proto}
  if isinstance(tokenizer, HFTokenizer):
    out = {"tokenizer.json": tokenizer.json_bytes}
    if tokenizer.sidecar_bytes is not None:
      out[HFTokenizer.SIDECAR] = tokenizer.sidecar_bytes
    return out
  return {}


def _gpt2_byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which the `tokenizers` ByteLevel steps use."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  chars, extra = dict(zip(printable, map(chr, printable))), 0
  for b in range(256):
    if b not in chars:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def byte_tokenizer_files() -> dict[str, bytes]:
  """ByteTokenizer as a Hugging Face tokenizer.json (+ tokenizer_config.json) with the same ids:
  <pad>=0, <s>=1, </s>=2, byte b = b + 3. A byte-level BPE without merges: every byte is one
  token, so transformers' AutoTokenizer encodes and decodes exactly as ByteTokenizer does."""
  from tokenizers import AddedToken, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer as HFTokenizerModel  # pylint: disable=g-import-not-at-top
  specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
  vocab = {**specials, **{c: b + BYTE_OFFSET for b, c in _gpt2_byte_chars().items()}}
  tok = HFTokenizerModel(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
  sidecar = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
             "model_max_length": 1 << 30,
             "foundation": "byte tokenizer: <pad>=0, <s>=1, </s>=2, UTF-8 byte b = id b + 3"}
  return {"tokenizer.json": tok.to_str().encode("utf-8"),
          HFTokenizer.SIDECAR: json.dumps(sidecar, indent=2).encode("utf-8")}


KINDS = {ByteTokenizer: "byte", SentencePieceTokenizer: "sentencepiece", HFTokenizer: "hf"}


def _sha256(contents: dict[str, bytes]) -> str:
  """The sha256 of a tokenizer's files (`files`), in their order."""
  return hashlib.sha256(b"".join(contents.values())).hexdigest()


def fingerprint(tokenizer: Tokenizer, name: str = "") -> dict:
  """JSON naming a tokenizer exactly: kind, vocab_size, sha256 of its files in order (None for
  bytes), and the file to name as data.tokenizer when resuming from a workdir's copy."""
  contents = files(tokenizer)
  sha = _sha256(contents) if contents else None
  return {"kind": KINDS[type(tokenizer)], "name": name or getattr(tokenizer, "path", "byte"),
          "vocab_size": tokenizer.vocab_size, "sha256": sha,
          "file": next(iter(contents), None)}


def describe(fp: dict) -> str:
  """'sentencepiece, vocab 8000, sha256 0123456789ab' or 'byte, vocab 259' for a fingerprint."""
  sha = f", sha256 {fp['sha256'][:12]}" if fp.get("sha256") else ""
  return f"{fp.get('kind')}, vocab {fp.get('vocab_size')}{sha}"


def _has_checkpoints(workdir) -> bool:
  folder = workdir / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


# Every file `files` may write, each tokenizer's in the order `files` gives them.
WORKDIR_FILES = ("tokenizer.model", "tokenizer.json", HFTokenizer.SIDECAR)


def store_tokenizer(tokenizer: Tokenizer, name: str, workdir: str, write: bool) -> None:
  """Keeps the run's tokenizer files in the workdir (WORKDIR/tokenizer.model, or tokenizer.json
  and tokenizer_config.json; written when `write`, on one process, each atomically). Once
  checkpoints exist the files belong to them: another tokenizer is then an error, and they are
  never replaced. Before that, they are simply replaced."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  ours = fingerprint(tokenizer, name)
  # One tokenizer's files at most (a write removes the others first), in `files` order.
  stored = {f: (workdir / f).read_bytes() for f in WORKDIR_FILES if (workdir / f).exists()}
  stored_kind = next((f for f in stored if f != HFTokenizer.SIDECAR), None)
  stored_sha = _sha256(stored) if stored_kind is not None else None
  if stored_sha == ours["sha256"]:
    return
  if _has_checkpoints(workdir):
    if stored_sha is not None:
      path = workdir / stored_kind
      raise ValueError(
          f"data.tokenizer={name!r} ({describe(ours)}) is not the tokenizer of this workdir's "
          f"checkpoints, {path} (sha256 {stored_sha[:12]}): use --config.data.tokenizer={path}, "
          f"or a new --workdir")
    return  # an older run without the file: the checkpoints' metadata still has the sha256
  if not write:
    return
  for f in stored:  # another tokenizer's files, left by a run that never checkpointed
    (workdir / f).unlink(missing_ok=True)
  workdir.mkdir(parents=True, exist_ok=True)
  for f, contents in files(tokenizer).items():
    partial = workdir / f".{f}.partial"
    partial.write_bytes(contents)
    partial.replace(workdir / f)  # atomic, and replaces a file no checkpoint depends on
