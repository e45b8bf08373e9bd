"""Assembles the per-host input: sources -> packed rows -> [mixture] -> shuffled host batches;
and eval batches that are the same rows whatever the host count.

The on-the-fly train pipeline, in tf.data ops that all checkpoint their position (no generators):

  per source: documents (files shuffled per epoch by config.seed, endless; or TFDS examples)
      -> tokenize, [bos] + ids + [eos] -> concatenate and chunk into rows of seq_len (packing.py)
  -> mixture.choose (a fixed periodic order by weight; a single source passes through)
  -> shuffle rows (consecutive rows come from the same document) -> batch -> segment ids and
     positions -> prefetch

in one of two layouts. Global (one host, or no source with 8 files per host): every host runs the
same pipeline of global batches and keeps its rows of each, so batches, losses and the saved
position are the same for any host count, and a run resumes on another one. Per host (a TFDS
source, or enough files): each host reads its own files or TFDS slice (or every P-th row of a
source with few files) and batches only its share; its position is its own, and resuming on
another host count is refused.

Prepared sources ('prepared:DIR', see prepared.py) skip all of that: numpy reads of
memory-mapped token shards, with a global position that resumes on any host count.

Eval: the first eval.steps * batch_size rows of the eval split(s), read whole and in order by
every host; the last batch is padded with loss_mask=0 rows, and host p takes rows [p*b, (p+1)*b)
of each batch. The loss sums over these rows are then the same for any host count.

TensorFlow is imported only here, lazily, when a tf.data source is used, so `import
foundation.data`, the synthetic and the prepared sources work without it.
"""

import json
import math
import re

import numpy as np

from foundation.data import documents
from foundation.data import iterators
from foundation.data import mixture
from foundation.data import packing
from foundation.data import prepared
from foundation.data import synthetic
from foundation.data import tokenizers


def host_batch_size(config, process_count: int) -> int:
  """config.batch_size (global) // process_count, checking that it divides."""
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} (global) is not divisible by the process "
                     f"count {process_count}: each host must load an equal share")
  return config.batch_size // process_count


def data_error(error) -> ValueError | None:
  """A tf.data error raised by our own checks (documents.ERROR_MARK), as one plain line."""
  text = getattr(error, "message", str(error))
  start = text.find(documents.ERROR_MARK)
  if start < 0:
    return None
  text = re.sub(r"\]\s*\[", "", text[start:].split("\n")[0])  # Assert brackets each piece
  text = text.replace("\\'", "'").replace('\\"', '"')  # and escapes quotes
  return ValueError(text.rstrip("]").strip())


def check_first_batch(inputs: np.ndarray, specials, source_list) -> None:
  """The first batch holds some token besides the tokenizer's specials (BOS/EOS/pad): a source
  too large for documents.check_has_text to read whole that is empty is caught here."""
  if specials and np.isin(inputs, list(specials)).all():
    raise iterators.input_error(
        f"no text to train on: the first batch of {', '.join(s.where for s in source_list)} "
        f"holds only BOS/EOS tokens ({inputs.size} of them): its documents are empty")


def _numpy(element) -> dict[str, np.ndarray]:
  return {name: value.numpy() for name, value in element.items()}


class TfDataIterator(iterators.DataIterator):
  """A DataIterator over a tf.data pipeline; its state is tf.data's own iterator checkpoint, plus
  the rows drawn per source so far (for the realised mixture)."""

  def __init__(self, dataset, process_index: int, process_count: int, source_list,
               description: dict, host_rows: slice | None = None, specials=()):
    self.process_index, self.process_count = process_index, process_count
    self.dataset = dataset
    self.host_rows = host_rows  # this host's rows of each global batch (global pipelines)
    self.sources = source_list
    self.rows_per_source = np.zeros(len(source_list), np.int64)
    self._description = description
    self._iterator = iter(dataset)
    self.first = True
    self._tokenizer_specials = specials

  def __next__(self) -> dict[str, np.ndarray]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    error = None
    try:
      batch = _numpy(next(self._iterator))
    except tf.errors.OpError as e:
      error = data_error(e)
      if error is None:
        raise
    if error is not None:
      # Met mid-run: the trainer's step loop sees it, so it must be the error type the trainer
      # prints as one line (at set-up, e.g. one file whose eval split reads the bad line first,
      # it already was). Raised outside the `except`, so that no traceback keeps the failed
      # tf.data iterator alive, and dropped now: left to the interpreter's last garbage
      # collection, its py_function threads hang the process at exit.
      self._iterator = None
      raise iterators.input_error(str(error))
    if self.first:  # all of one global batch, before this host takes its rows
      self.first = False
      check_first_batch(batch["inputs"], self._tokenizer_specials, self.sources)
    if self.host_rows is not None:
      batch = {name: value[self.host_rows] for name, value in batch.items()}
    self.rows_per_source += np.bincount(batch.pop("source"), minlength=len(self.sources))
    return batch

  def _kind(self) -> str:
    return self._description["position_kind"]

  def save(self, directory: str) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = self._prefix(directory)
    tf.train.Checkpoint(iterator=self._iterator).write(prefix)
    with tf.io.gfile.GFile(prefix + ".json", "w") as f:
      f.write(json.dumps({"rows_per_source": self.rows_per_source.tolist(),
                          "position_kind": self._kind(), "process_count": self.process_count}))

  def restore(self, directory: str) -> None:
    """Moves to the saved position. A global pipeline is the same on every host and for every
    host count, so any process's global state will do; a per-host one needs this process's own."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = self._prefix(directory)
    found = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
    if not tf.io.gfile.exists(prefix + ".index"):
      saved = sorted(n[:-len(".index")] for n in found
                     if n.startswith("process_") and n.endswith(".index"))
      if self._kind() != "tf.data-global" or not saved:
        raise iterators.missing_state_error(directory, prefix, found,
                                            ", ".join(s.spec for s in self.sources))
      prefix = f"{directory.rstrip('/')}/{saved[0]}"
    state = {}
    if tf.io.gfile.exists(prefix + ".json"):
      with tf.io.gfile.GFile(prefix + ".json") as f:
        state = json.loads(f.read())
    if state.get("position_kind", self._kind()) != self._kind():
      # The other layout's state would restore "successfully" onto the wrong documents.
      raise iterators.host_count_error(state.get("process_count"), self.process_count,
                                       ", ".join(s.spec for s in self.sources),
                                       f"the checkpoint folder {directory}")
    tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
    if "rows_per_source" in state:
      self.rows_per_source = np.asarray(state["rows_per_source"], np.int64)

  def description(self) -> dict:
    return {**self._description, "rows_per_source": self.rows_per_source.tolist()}

  def metrics(self) -> dict[str, float]:
    return mixture.shares(self.sources, self.rows_per_source)


# ---------------------------------------------------------------- pieces

def _options():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.deterministic = True
  # SentencePiece and JSON parsing run in tf.py_function, which tf.data cannot serialise. Both
  # are pure functions of their input (as are the UTF-8 checks' print and assert), so there is no
  # state to lose: checkpoint the iterator regardless.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return options


def _tokenizer(config) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  tokenizers.check_vocab_size(tokenizer, config)
  return tokenizer


def describe(config, tokenizer, source_list, process_count: int, position_kind: str) -> dict:
  """What made an iterator's position (for the checkpoint metadata and the resume checks)."""
  return {
      "sources": [[s.spec, s.weight] for s in source_list],
      "tokenizer": tokenizers.fingerprint(tokenizer, config.data.tokenizer),
      "model_vocab_size": config.model.vocab_size,
      "seq_len": config.seq_len,
      "process_count": process_count,
      "position_kind": position_kind,
  }


def _source_rows(config, tokenizer, source, index: int, process_index: int, process_count: int,
                 per_host: bool):
  """Endless packed rows of one source, tagged with the source's index: all of them for a global
  pipeline; for a per-host one, this host's files' rows, or every P-th row of all files."""
  own_files = per_host and documents.splits_by_host(config, source, process_count)
  docs = documents.train_documents(config, source, process_index if own_files else 0,
                                   process_count if own_files else 1, seed=config.seed + index)
  rows = packing.pack_rows(docs, tokenizer, config.seq_len)
  if per_host and not own_files:
    rows = rows.shard(process_count, process_index)
  return rows.map(lambda row: {**row, "source": index})


def _batches(rows, host_batch: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def finish(rows):
    return {**packing.finish_batch(rows), "source": rows["source"]}
  return rows.batch(host_batch, drop_remainder=True).map(
      finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---------------------------------------------------------------- public

def make_train_iterator(config, process_index: int,
                        process_count: int) -> iterators.DataIterator:
  """This process's endless train batches: int32 [batch_size // process_count, seq_len] arrays
  inputs, targets, segment_ids, positions, loss_mask; with save/restore for exact resume."""
  host_batch = host_batch_size(config, process_count)
  source_list = mixture.config_sources(config)
  if source_list[0].kind == "synthetic":
    it = synthetic.SyntheticIterator(
        seed=config.seed, host_batch=host_batch, seq_len=config.seq_len,
        vocab_size=config.model.vocab_size, process_index=process_index,
        process_count=process_count)
    it._description = describe(config, tokenizers.make_tokenizer(config.data.tokenizer),
                               source_list, process_count, "synthetic")
    return it
  tokenizer = _tokenizer(config)
  if source_list[0].kind == "prepared":
    return prepared.PreparedIterator(
        prepared.PreparedData(config, source_list, tokenizer), host_batch, process_index,
        process_count, describe(config, tokenizer, source_list, process_count, "prepared"))
  # Per host: each host reads its own share and batches it. Global, when no source has enough
  # files to split (or on one host): every host runs the one pipeline of global batches and keeps
  # its rows of each, so batches and positions do not depend on the host count.
  for source in source_list:  # a source with nothing to learn from would train on BOS/EOS alone
    documents.check_has_text(config, source)
  per_host = any(documents.splits_by_host(config, s, process_count) for s in source_list)
  counts = mixture.slot_counts([s.weight for s in source_list])
  rows = mixture.choose(
      [_source_rows(config, tokenizer, s, i, process_index, process_count, per_host)
       for i, s in enumerate(source_list)], counts)
  if config.data.shuffle_buffer > 1:
    # Consecutive rows come from the same document: mix them before they share a batch.
    rows = rows.shuffle(config.data.shuffle_buffer, seed=config.seed)
  batches = _batches(rows, host_batch if per_host else config.batch_size)
  if config.data.prefetch > 0:
    batches = batches.prefetch(config.data.prefetch)
  first = process_index * host_batch
  return TfDataIterator(
      batches.with_options(_options()), process_index, process_count, source_list,
      describe(config, tokenizer, source_list, process_count,
               "tf.data" if per_host else "tf.data-global"),
      host_rows=None if per_host else slice(first, first + host_batch),
      specials={tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id})


def _tf_eval_rows(config, tokenizer, source_list, limit: int) -> list[dict[str, np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  counts = mixture.slot_counts([s.weight for s in source_list])
  rows = mixture.choose(
      [packing.pack_rows(documents.all_documents(config, s, "eval"), tokenizer, config.seq_len,
                         drop_remainder=False) for s in source_list], counts)
  try:
    return [_numpy(row) for row in rows.take(limit).with_options(_options())]
  except tf.errors.OpError as e:
    error = data_error(e)
    if error is None:
      raise
    raise error from None


def eval_rows(config, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The global eval rows {inputs, targets, starts} in order (at most eval.steps * batch_size;
  the last row of a source may be short). The same list for every host."""
  del process_count  # the point: the rows do not depend on it
  source_list = mixture.config_sources(config)
  tokenizer = _tokenizer(config)
  limit = config.eval.steps * config.batch_size
  if source_list[0].kind == "prepared":
    return prepared.eval_rows(prepared.PreparedData(config, source_list, tokenizer), limit)
  return _tf_eval_rows(config, tokenizer, source_list, limit)


def make_eval_batches(config, process_index: int,
                      process_count: int) -> list[dict[str, np.ndarray]]:
  """This host's share of the eval batches: at most config.eval.steps host batches, the same
  number on every host, in a fixed order. A split smaller than eval.steps batches is used whole,
  its last batch padded with loss_mask=0 rows; the union over hosts is the same rows for any
  host count, so summed losses (and the eval metric) do not depend on it."""
  host_batch = host_batch_size(config, process_count)
  source_list = mixture.config_sources(config)
  if source_list[0].kind == "synthetic":
    return synthetic.synthetic_eval_batches(
        seed=config.seed, steps=config.eval.steps, host_batch=host_batch, seq_len=config.seq_len,
        vocab_size=config.model.vocab_size, process_index=process_index)
  rows = eval_rows(config)
  if not rows:
    raise ValueError(
        f"data.source={config.data.source!r}: the eval split holds no tokens; add eval data "
        f"(data.eval_fraction={config.data.eval_fraction}, data.eval_split="
        f"{config.data.eval_split!r}) or set eval.every=0")
  steps = math.ceil(len(rows) / config.batch_size)
  padded = packing.pad_rows(rows, config.seq_len, steps * config.batch_size)
  first = process_index * host_batch
  return [{name: value[b * config.batch_size + first:b * config.batch_size + first + host_batch]
           for name, value in padded.items()} for b in range(steps)]


def summary(iterator: iterators.DataIterator) -> str:
  """One line for the console: the sources and their shares, the tokenizer."""
  d = iterator.description()
  shares = " + ".join(f"{spec} {weight:.1%}" for spec, weight in d["sources"])
  if "tokenizer" not in d:  # an input without text (images, a test's own input)
    return f"data: {shares} of rows ({d.get('position_kind', '?')})"
  tok = d["tokenizer"]
  sha = f", sha256 {tok['sha256'][:12]}" if tok["sha256"] else ""
  return (f"data: {shares} of rows ({d['position_kind']}); {tok['kind']} tokenizer "
          f"({tok['vocab_size']} ids{sha})")
