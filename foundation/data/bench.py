r"""Input throughput, stage by stage, for one host: read, tokenize, pack, batch.

  python -m foundation.data.bench --config configs/lm.py:size=125m \
      --config.data.tokenizer=runs/sp.model [--config.data.source=...] [--seconds 10] \
      [--process_count 1] [--output benchmarks/data_results.json --name sp-onthefly]

Each stage runs the pipeline up to that point for --seconds (after one warm-up element) and reports
tokens/s for this host (process 0 of --process_count):
  read      documents read (and UTF-8 checked); tokens/s estimated from the bytes at the
            tokenize stage's bytes per token        [prepared: gathering rows of shuffled windows]
  tokenize  + tokenizer, [bos] + ids per document   [prepared: nothing to do]
  pack      + concatenate-and-chunk into rows       [prepared: + targets, segment ids, positions]
  batch     the whole train iterator, as the trainer calls it: shuffle, batch, segment ids,
            positions, prefetch, numpy
A mixture reports read/tokenize/pack for each source and batch for the mixture.
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from foundation.data import documents
from foundation.data import mixture
from foundation.data import packing
from foundation.data import pipeline
from foundation.data import prepared
from foundation.data import tokenizers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a command: importing this module must not claim --config."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                  lock_config=True)
  flags.DEFINE_float("seconds", 5.0, "How long each stage runs.")
  flags.DEFINE_integer("process_count", 1, "Measure process 0's share of this many hosts.")
  flags.DEFINE_string("output", "", "A JSON file to add this run's results to.")
  flags.DEFINE_string("name", "", "The key of this run in --output.")


def timed(elements, count, seconds: float) -> tuple[float, float]:
  """(units per second, seconds) over `elements` for `seconds`, after one warm-up element."""
  iterator = iter(elements)
  next(iterator)
  units, start = 0, time.perf_counter()
  for element in iterator:
    units += count(element)
    if time.perf_counter() - start >= seconds:
      break
  elapsed = time.perf_counter() - start
  return units / elapsed, elapsed


def _tf_stages(config, source, index: int, tokenizer, seconds: float, process_count: int) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = pipeline._options()  # pylint: disable=protected-access
  own_files = documents.splits_by_host(config, source, process_count)
  docs = documents.train_documents(config, source, 0, process_count if own_files else 1,
                                   seed=config.seed + index)
  docs = docs.with_options(options)
  # Sizes are counted in the graph and fetched 1024 at a time: a Python round trip per element
  # would measure Python, not the stage.
  sizes = lambda ds, size: ds.map(size).batch(1024).with_options(options)  # noqa: E731
  count = lambda sizes: int(sizes.numpy().sum())  # noqa: E731
  bytes_per_s, _ = timed(sizes(docs, tf.strings.length), count, seconds)
  tokens = packing.tokenize_documents(docs, tokenizer)
  sample_bytes = sample_tokens = 0
  for doc in docs.take(200):  # bytes per token, to put the read stage in tokens
    sample_bytes += len(doc.numpy())
    sample_tokens += len(tokenizer.encode(doc.numpy().decode("utf-8", "replace"))) + 1
  # Host 0 packs everything it reads (dropping other hosts' rows, when it must, saves nothing).
  rows = packing.pack_rows(docs, tokenizer, config.seq_len)
  bytes_per_token = sample_bytes / max(sample_tokens, 1)
  return {
      "read": bytes_per_s / bytes_per_token,
      "read_MB_per_s": bytes_per_s / 1e6,
      "bytes_per_token": bytes_per_token,
      "tokenize": timed(sizes(tokens, lambda d: tf.size(d["inputs"])), count, seconds)[0],
      "pack": timed(sizes(rows, lambda r: tf.size(r["inputs"])), count, seconds)[0],
  }


def _prepared_stages(config, tokenizer, seconds: float, process_count: int) -> dict:
  data = prepared.PreparedData(config, mixture.config_sources(config), tokenizer)
  split, length = data.train_splits()[0], config.seq_len
  num_rows = split.rows(length)
  host_batch = pipeline.host_batch_size(config, process_count)

  def windows():
    position = 0
    while True:
      rows = prepared.shuffled_rows(np.arange(position, position + host_batch), num_rows,
                                    config.seed, 0)
      position += host_batch
      yield split.windows(rows, length)

  def finished():
    for w in windows():
      yield packing.finish_rows(**packing.stream_rows(w, data.bos_id, data.eos_id))
  return {"read": timed(windows(), lambda w: w.shape[0] * length, seconds)[0],
          "pack": timed(finished(), lambda b: b["inputs"].size, seconds)[0]}


def run(config, seconds: float, process_count: int = 1) -> dict:
  """{stage: tokens/s} for process 0 of process_count (per source for a mixture)."""
  source_list = mixture.config_sources(config)
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  results = {}
  if source_list[0].kind == "prepared":
    results[source_list[0].spec] = _prepared_stages(config, tokenizer, seconds,
                                                     process_count)
  elif source_list[0].kind != "synthetic":
    for i, source in enumerate(source_list):
      results[source.spec] = _tf_stages(config, source, i, tokenizer, seconds, process_count)
  iterator = pipeline.make_train_iterator(config, 0, process_count)
  results["batch"] = timed(iterator, lambda b: b["inputs"].size, seconds)[0]
  results["realised_shares"] = iterator.metrics()
  return results


def environment() -> dict:
  import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
  versions = {}
  for package in ("tensorflow-cpu", "tensorflow", "sentencepiece", "numpy", "jax"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
          "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/lm.py:size=tiny")
  command = " ".join(["python -m foundation.data.bench", *sys.argv[1:]])
  try:
    results = run(config, FLAGS.seconds, FLAGS.process_count)
  except ValueError as e:
    raise SystemExit(f"bench error: {e}") from None
  print(f"# {command}")
  print(f"# tokens/s for process 0 of {FLAGS.process_count}, seq_len {config.seq_len}, host "
        f"batch {config.batch_size // FLAGS.process_count}, tokenizer {config.data.tokenizer}")
  for name, stages in results.items():
    if isinstance(stages, dict) and name != "realised_shares":
      for stage in ("read", "tokenize", "pack"):
        if stage in stages:
          print(f"{stage:>8}  {stages[stage]:>14,.0f} tokens/s   {name}")
  print(f"{'batch':>8}  {results['batch']:>14,.0f} tokens/s   (the train iterator)")
  if len(results["realised_shares"]) > 1:
    print("shares: " + ", ".join(f"{k} {v:.3f}" for k, v in results["realised_shares"].items()))
  if FLAGS.output:
    existing = {}
    if os.path.exists(FLAGS.output):
      with open(FLAGS.output) as f:
        existing = json.load(f)
    existing[FLAGS.name or config.data.source] = {
        "command": command, "environment": environment(), "tokens_per_s": results}
    with open(FLAGS.output, "w") as f:
      json.dump(existing, f, indent=2, sort_keys=True)
      f.write("\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
