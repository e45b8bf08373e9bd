"""Assembles the per-host input: documents -> packed rows -> shuffled host batches; eval batches.

The train pipeline, in tf.data ops that all checkpoint their position (no generators):

  documents (file list shuffled per epoch by config.seed, repeated forever; or a TFDS slice)
    -> tokenize, [bos] + ids + [eos] -> concatenate and chunk into rows of seq_len (packing.py)
    -> [this host's every P-th row, when there are too few files to give each host its own]
    -> shuffle rows (consecutive rows come from the same document) -> batch -> segment ids and
       positions -> prefetch

Each process reads a disjoint share: its own files (or TFDS slice) when there are enough, else every
P-th row of the common stream. TensorFlow is imported only here and only when a tf.data source is
used, so `import foundation.data` and the synthetic source work without it.
"""

from absl import logging
import numpy as np

from foundation.data import iterators
from foundation.data import packing
from foundation.data import sources
from foundation.data import synthetic
from foundation.data import tokenizers

# Below this many files per process, hosts share the file stream and split its rows instead: a
# host holding one or two files would see a skewed corpus and run out of variety quickly.
MIN_FILES_PER_PROCESS = 8


def host_batch_size(config, process_count: int) -> int:
  """config.batch_size (global) // process_count, checking that it divides."""
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} (global) is not divisible by the process "
                     f"count {process_count}: each host must load an equal share")
  return config.batch_size // process_count


class TfDataIterator(iterators.DataIterator):
  """A DataIterator over a tf.data pipeline; its state is tf.data's own iterator checkpoint."""

  def __init__(self, dataset, process_index: int, process_count: int):
    self.process_index, self.process_count = process_index, process_count
    self.dataset = dataset
    self._iterator = iter(dataset)

  def __next__(self) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in next(self._iterator).items()}

  def save(self, directory: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.train.Checkpoint(iterator=self._iterator).write(self._prefix(directory))

  def restore(self, directory: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + ".index"):
      found = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
      raise iterators.missing_state_error(directory, prefix, found)
    tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()


# ---------------------------------------------------------------- pieces

def _options(tokenizer):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.deterministic = True
  if tokenizer.has_external_state:
    # SentencePiece runs in a tf.py_function, which tf.data cannot serialise. Encoding is a pure
    # function of the text, so there is no state to lose: checkpoint the iterator regardless.
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
  return options


def _tokenizer(config) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  tokenizers.check_vocab_size(tokenizer, config)
  return tokenizer


def _host_files(config, split: str, process_index: int,
                process_count: int) -> tuple[list[str], bool]:
  """(files this host reads, whether hosts must split rows instead because files are few)."""
  files = sources.file_split(config, split)
  if len(files) >= MIN_FILES_PER_PROCESS * process_count:
    return files[process_index::process_count], False
  return files, True


def _read_files(files, shuffle_seed: int | None):
  """tf.data of file contents; with a seed, shuffled afresh each epoch and repeated forever."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensor_slices(files)
  if shuffle_seed is not None:
    # Shuffle before repeat: each epoch is a whole permutation, so no file comes round twice
    # before every other has come once.
    ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
  return ds.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _documents(config, split: str, process_index: int, process_count: int):
  """(tf.data of this host's `split` documents, whether rows still need sharding across hosts).

  'train' is shuffled per epoch and endless; 'eval' is one pass in a fixed order.
  """
  train = split == "train"
  kind, _ = sources.parse_source(config.data.source)
  if kind == "tfds":
    tfds_split = config.data.train_split if train else config.data.eval_split
    docs = sources.tfds_documents(config, tfds_split, process_index, process_count, shuffle=train)
    return (docs.repeat() if train else docs), False
  files, shard_rows = _host_files(config, split, process_index, process_count)
  logging.info("data %s: %d files for process %d of %d (%s)", split, len(files), process_index,
               process_count, "rows split across processes" if shard_rows else "files split")
  return _read_files(files, config.seed if train else None), shard_rows


def _host_rows(config, tokenizer, split: str, process_index: int, process_count: int):
  docs, shard_rows = _documents(config, split, process_index, process_count)
  rows = packing.pack_rows(docs, tokenizer, config.seq_len)
  if shard_rows and process_count > 1:
    rows = rows.shard(process_count, process_index)
  return rows


def _batches(rows, host_batch: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return rows.batch(host_batch, drop_remainder=True).map(
      packing.finish_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---------------------------------------------------------------- public

def make_train_iterator(config, process_index: int,
                        process_count: int) -> iterators.DataIterator:
  """This process's endless train batches: int32 [batch_size // process_count, seq_len] arrays
  inputs, targets, segment_ids, positions, loss_mask; with save/restore for exact resume."""
  host_batch = host_batch_size(config, process_count)
  kind, _ = sources.parse_source(config.data.source)
  if kind == "synthetic":
    return synthetic.SyntheticIterator(
        seed=config.seed, host_batch=host_batch, seq_len=config.seq_len,
        vocab_size=config.model.vocab_size, process_index=process_index,
        process_count=process_count)
  tokenizer = _tokenizer(config)
  rows = _host_rows(config, tokenizer, "train", process_index, process_count)
  if config.data.shuffle_buffer > 1:
    # Consecutive rows come from the same document: mix them before they share a batch.
    rows = rows.shuffle(config.data.shuffle_buffer, seed=config.seed)
  batches = _batches(rows, host_batch)
  if config.data.prefetch > 0:
    batches = batches.prefetch(config.data.prefetch)
  return TfDataIterator(batches.with_options(_options(tokenizer)), process_index, process_count)


def make_eval_batches(config, process_index: int,
                      process_count: int) -> list[dict[str, np.ndarray]]:
  """Exactly config.eval.steps host batches of the eval split, in a fixed order (no shuffling):
  the same list on every call. A split with fewer rows is cycled to fill the count."""
  host_batch = host_batch_size(config, process_count)
  steps = config.eval.steps
  kind, _ = sources.parse_source(config.data.source)
  if kind == "synthetic":
    return synthetic.synthetic_eval_batches(
        seed=config.seed, steps=steps, host_batch=host_batch, seq_len=config.seq_len,
        vocab_size=config.model.vocab_size, process_index=process_index)
  tokenizer = _tokenizer(config)
  rows = _host_rows(config, tokenizer, "eval", process_index, process_count)
  # repeat() ends at once on an empty input, so a too-small split is caught below, not looped on.
  batches = _batches(rows.repeat(), host_batch).take(steps).with_options(_options(tokenizer))
  result = [{name: value.numpy() for name, value in batch.items()} for batch in batches]
  if len(result) < steps:
    raise ValueError(
        f"data.source={config.data.source!r}: the eval split of process {process_index} holds no "
        f"complete row of seq_len={config.seq_len} tokens; add eval data (data.eval_fraction="
        f"{config.data.eval_fraction}, data.eval_split={config.data.eval_split!r})")
  return result
