r"""Tokenizes a source once into sharded token files with a manifest, for large runs.

  python -m foundation.data.prepare --config configs/lm.py:size=125m \
      --config.data.source='files:/data/books/*.jsonl' --config.data.tokenizer=runs/sp.model \
      --output /data/prepared/books [--shard_tokens 134217728] [--max_docs 0]

then train with --config.data.source=prepared:/data/prepared/books (or mix prepared folders:
--config.data.mixture='prepared:/data/p/a:0.8,prepared:/data/p/b:0.2'). The same folder serves any
seq_len and any host count; its train position resumes exactly on any number of hosts.

The folder (see prepared.py): train-NNNNN.npy and eval-NNNNN.npy token-stream shards, manifest.json,
and tokenizer.model when the tokenizer is SentencePiece. Everything is written into a
`<output>.partial-<pid>` folder that is renamed to <output> only when complete, so a failed or
killed run leaves nothing that looks prepared. Documents that are not UTF-8 text stop it
(data.invalid_utf8='fail', naming the file) or are skipped and counted ('skip').
"""

import datetime
import hashlib
import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from foundation.data import documents
from foundation.data import mixture
from foundation.data import packing
from foundation.data import prepared
from foundation.data import tokenizers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a command: importing this module must not claim --config."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                  lock_config=True)
  flags.DEFINE_string("output", None, "The folder to create (must not exist).")
  flags.DEFINE_integer("shard_tokens", 2**27, "Tokens per shard file.")
  flags.DEFINE_integer("max_docs", 0, "Prepare at most this many documents per split (0: all).")


class ShardWriter:
  """Appends token arrays; writes <split>-NNNNN.npy shards of `shard_tokens` tokens each."""

  def __init__(self, directory: str, split: str, dtype, shard_tokens: int):
    self.directory, self.split, self.dtype = directory, split, dtype
    self.shard_tokens = shard_tokens
    self.pending, self.pending_tokens = [], 0
    self.shards = []

  def add(self, tokens: np.ndarray) -> None:
    self.pending.append(tokens.astype(self.dtype, copy=False))
    self.pending_tokens += len(tokens)
    while self.pending_tokens >= self.shard_tokens:
      self._write(self.shard_tokens)

  def _write(self, count: int) -> None:
    stream = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
    shard, rest = stream[:count], stream[count:]
    name = f"{self.split}-{len(self.shards):05d}.npy"
    np.save(os.path.join(self.directory, name), shard)
    self.shards.append({"file": name, "length": int(len(shard)),
                        "sha256": hashlib.sha256(np.ascontiguousarray(shard).data).hexdigest()})
    self.pending, self.pending_tokens = ([rest], len(rest)) if len(rest) else ([], 0)

  def close(self) -> list[dict]:
    if self.pending_tokens:
      self._write(self.pending_tokens)
    return self.shards


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.uint32


def _document_streams(config, source, split: str, tokenizer, max_docs: int):
  """tf.data of batches {inputs: ragged [bos] + ids, valid, where} of documents in order (the
  invalid ones empty)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = documents.all_documents(config, source, split, checked=False)
  if max_docs:
    records = records.take(max_docs)

  def tokenize(batch):
    ids = packing.encode_batch(tokenizer, tf.where(batch["valid"], batch["text"], ""))
    bos = tf.fill([ids.nrows(), 1], tokenizer.bos_id)
    return {"inputs": tf.concat([tf.RaggedTensor.from_tensor(bos), ids], axis=1),
            "valid": batch["valid"], "where": batch["where"]}
  return records.batch(packing.ENCODE_BATCH).map(
      tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(8)


def prepare_split(config, source, split: str, tokenizer, directory: str, shard_tokens: int,
                  max_docs: int = 0) -> dict:
  """Writes one split's shards; returns its manifest entry (tokens, documents, skipped, shards)."""
  from foundation.data import pipeline  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  writer = ShardWriter(directory, split, token_dtype(tokenizer.vocab_size), shard_tokens)
  tokens = docs = skipped = max_id = 0
  stream = _document_streams(config, source, split, tokenizer, max_docs)
  try:
    for batch in stream.with_options(pipeline._options()):  # pylint: disable=protected-access
      valid = batch["valid"].numpy()
      if not valid.all():
        if config.data.invalid_utf8 == "fail":
          where = batch["where"].numpy()[np.argmin(valid)].decode("utf-8", "replace")
          raise ValueError(f"{where} is not UTF-8 text (data.invalid_utf8='fail'; set it to "
                           f"'skip' to drop such documents)")
        skipped += int((~valid).sum())
      ids = batch["inputs"].flat_values.numpy()  # invalid documents are a lone bos: drop them
      keep = np.repeat(valid, batch["inputs"].row_lengths().numpy())
      ids = ids[keep]
      writer.add(ids)
      tokens, docs = tokens + len(ids), docs + int(valid.sum())
      max_id = max(max_id, int(ids.max()) if len(ids) else 0)
  except tf.errors.OpError as e:
    raise pipeline.data_error(e) or e from None
  writer.add(np.asarray([tokenizer.bos_id]))  # the sentinel: the last token's target is eos
  return {"tokens": tokens, "documents": docs, "skipped_documents": skipped, "max_id": max_id,
          "shards": writer.close()}


def prepare(config, output: str, shard_tokens: int = 2**27, max_docs: int = 0,
            log=print) -> dict:
  """Prepares config's single source into `output` (which must not exist); returns the manifest."""
  source_list = mixture.config_sources(config)
  if len(source_list) != 1 or source_list[0].kind not in ("embedded", "files", "tfds"):
    raise ValueError(
        f"prepare reads one text source (embedded, files:GLOB or tfds:NAME), not "
        f"{config.data.mixture or config.data.source!r}; prepare each source of a mixture on its "
        f"own and mix the folders: --config.data.mixture='prepared:A:0.8,prepared:B:0.2'")
  source = source_list[0]
  if os.path.exists(output):
    raise ValueError(f"--output {output} exists; remove it or choose another folder")
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  partial = f"{output.rstrip('/')}.partial-{os.getpid()}"
  os.makedirs(partial)
  try:
    splits = {}
    for split in ("train", "eval"):
      if split == "eval" and source.kind != "tfds" and config.data.eval_fraction <= 0:
        continue
      splits[split] = prepare_split(config, source, split, tokenizer, partial, shard_tokens,
                                    max_docs)
      entry = splits[split]
      log(f"{split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens, "
          f"{len(entry['shards'])} shard(s); skipped {entry['skipped_documents']} not UTF-8")
    fingerprint = tokenizers.fingerprint(tokenizer, config.data.tokenizer)
    for name, contents in tokenizers.files(tokenizer).items():  # the data's tokenizer, kept with it
      with open(os.path.join(partial, name), "wb") as f:
        f.write(contents)
    manifest = {
        "format": prepared.FORMAT,
        "source": source.spec,
        "settings": {k: config.data[k] for k in ("file_format", "text_feature", "invalid_utf8",
                                                 "eval_fraction", "train_split", "eval_split")},
        "tokenizer": fingerprint,
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "max_id": max(s["max_id"] for s in splits.values()),
        "splits": splits,
        "fingerprint": prepared.fingerprint(splits, fingerprint["sha256"] or "byte"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m foundation.data.prepare", *sys.argv[1:]]),
    }
    with open(prepared.manifest_path(partial), "w") as f:
      json.dump(manifest, f, indent=2)
    os.rename(partial, output)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return manifest


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None or not FLAGS.output:
    raise app.UsageError("--config and --output are required, e.g. --config "
                         "configs/lm.py:size=tiny --output data/prepared/stdlib")
  try:
    manifest = prepare(FLAGS.config, FLAGS.output, FLAGS.shard_tokens, FLAGS.max_docs)
  except ValueError as e:
    raise SystemExit(f"prepare error: {e}") from None
  print(f"wrote {FLAGS.output} ({manifest['splits']['train']['tokens']:,} train tokens); train "
        f"with --config.data.source=prepared:{FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
