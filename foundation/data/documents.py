"""tf.data datasets of documents (tf.string, one element one document) for each kind of source.

Readers by file format: text (a file is a document), JSONL (a line is a document: its
`data.text_feature` string field) and TFRecord (a tf.train.Example is a document: its bytes feature
`data.text_feature`). Every document then passes the UTF-8 policy, `data.invalid_utf8`:
  'fail'  stop at the first document that is not UTF-8 text, naming its file (and line);
  'skip'  drop it and print one line naming it (so the skipped ones can be counted).

Train documents: a host's share (its files, or its TFDS slice) or all of them (see
`splits_by_host`), file order shuffled per epoch from a seed, endless.
Eval documents: the whole eval split on every host in a fixed order, one pass, so the eval rows do
not depend on the host count (pipeline.py takes each host's rows of each batch).
"""

import json
import sys

import numpy as np

from foundation.data import sources

# Below this many files per process, hosts share the file stream and split its rows instead: a
# host holding one or two files would see a skewed corpus and run out of variety quickly.
MIN_FILES_PER_PROCESS = 8
# Marks the messages of errors raised inside tf.data, so the iterator can show them plainly.
ERROR_MARK = "data error: "
_UTF8_POLICIES = ("fail", "skip")


def utf8_valid(text):
  """bool scalar: `text` (tf.string) is valid UTF-8. Invalid bytes decode to U+FFFD, so the text
  is valid exactly when decoding and re-encoding gives it back."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  chars = tf.strings.unicode_decode(text, "UTF-8", errors="replace", replacement_char=0xFFFD)
  return tf.equal(tf.strings.unicode_encode(chars, "UTF-8"), text)


def check_policy(config) -> None:
  if config.data.invalid_utf8 not in _UTF8_POLICIES:
    raise ValueError(f"data.invalid_utf8={config.data.invalid_utf8!r} is not one of "
                     f"{_UTF8_POLICIES}")


def _apply_utf8_policy(ds, policy: str):
  """{text, valid, where} elements -> text elements, failing on or skipping invalid ones."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if policy == "fail":
    def check(element):
      tf.debugging.Assert(element["valid"], [
          ERROR_MARK, element["where"], " is not UTF-8 text (data.invalid_utf8='fail'; set it to "
          "'skip' to drop such documents)"])
      return element["text"]
    return ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def keep(element):
    def report():
      tf.print("data: skipped", element["where"], "(not UTF-8 text; data.invalid_utf8='skip')",
               output_stream=sys.stderr)
      return False
    return tf.cond(element["valid"], lambda: True, report)
  return ds.filter(keep).map(lambda element: element["text"])


# ---------------------------------------------------------------- file formats

def _text_files(paths):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def read(path):
    text = tf.io.read_file(path)
    return {"text": text, "valid": utf8_valid(text), "where": path}
  return paths.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# JSON lines are parsed in Python (no JSON op in the TF graph), this many per call: one
# tf.py_function call per line would cost more than the parsing.
JSON_BATCH = 256


def _json_field(field: str):
  """A py_function body: (path, line numbers [n], lines [n]) -> (UTF-8 texts [n], valid [n]) of
  each line's `field`. A line that is not UTF-8 is invalid (the policy decides); one that is not
  JSON or lacks the field is an error naming the file and line."""
  def parse(path, numbers, lines):
    texts, valid = [], []
    for number, line in zip(numbers.numpy(), lines.numpy()):
      where = f"{path.numpy().decode('utf-8', 'replace')}:{int(number)}"
      try:
        record = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError:
        texts.append(b"")
        valid.append(False)
        continue
      except json.JSONDecodeError as e:
        raise ValueError(f"{ERROR_MARK}{where} is not a JSON line ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{ERROR_MARK}{where}: no string field {field!r} (data.text_feature); "
                         f"the line has {keys}")
      texts.append(record[field].encode("utf-8"))
      valid.append(True)
    return np.asarray(texts, dtype=object), np.asarray(valid, dtype=bool)
  return parse


def _jsonl_files(paths, field: str, compression: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parse = _json_field(field)

  def lines(path):
    numbered = tf.data.TextLineDataset(path, compression_type=compression).enumerate(start=1)
    # Blank lines (a trailing newline, spacing) are not documents.
    numbered = numbered.filter(lambda number, line: tf.strings.length(tf.strings.strip(line)) > 0)

    def parsed(numbers, lines):
      texts, valid = tf.py_function(parse, [path, numbers, lines], [tf.string, tf.bool])
      where = tf.strings.join([tf.fill(tf.shape(numbers), path), tf.strings.as_string(numbers)],
                              separator=":")
      return {"text": tf.ensure_shape(texts, [None]), "valid": tf.ensure_shape(valid, [None]),
              "where": where}
    return numbered.batch(JSON_BATCH).map(parsed).unbatch()
  return paths.interleave(lines, cycle_length=1)


def _tfrecord_files(paths, field: str, compression: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {field: tf.io.FixedLenFeature([], tf.string)}

  def records(path):
    def element(number, record):
      text = tf.io.parse_single_example(record, spec)[field]
      where = tf.strings.join([path, " record ", tf.strings.as_string(number)])
      return {"text": text, "valid": utf8_valid(text), "where": where}
    return tf.data.TFRecordDataset(path, compression_type=compression).enumerate().map(element)
  return paths.interleave(records, cycle_length=1)


def peek_format(config, source: sources.Source, fmt: str, path: str) -> None:
  """Checks the first document of `path` has the configured field; the error lists what it has.

  Runs at set-up, so a wrong data.text_feature is a clear error before anything is compiled.
  """
  field = config.data.text_feature
  if fmt == "jsonl":
    import gzip  # pylint: disable=g-import-not-at-top
    import io  # pylint: disable=g-import-not-at-top
    raw = sources.read_file(path)
    raw = gzip.decompress(raw) if path.endswith(".gz") else raw
    first = next((line for line in io.BytesIO(raw) if line.strip()), None)
    try:
      record = json.loads(first) if first is not None else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f"{source.where}: the first line of {path} is not JSON; is it a JSONL "
                       f"file? (data.file_format={config.data.file_format!r})") from None
    if first is not None and not isinstance(record.get(field) if isinstance(record, dict)
                                            else None, str):
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"data.text_feature={field!r}: the JSONL lines of {path} "
                       f"({source.where}) have no such string field; the first has {keys}")
  elif fmt == "tfrecord":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      first = next(iter(tf.data.TFRecordDataset(path, sources.compression(path)).take(1)), None)
      example = tf.train.Example.FromString(first.numpy()) if first is not None else None
    except (tf.errors.OpError, ValueError) as e:
      raise ValueError(f"{source.where}: {path} is not a TFRecord file of tf.train.Example "
                       f"({type(e).__name__})") from None
    if example is not None:
      features = example.features.feature
      if field not in features or features[field].WhichOneof("kind") != "bytes_list":
        kinds = {k: v.WhichOneof("kind") for k, v in sorted(features.items())}
        raise ValueError(f"data.text_feature={field!r}: the records of {path} ({source.where}) "
                         f"have no such bytes feature; they have {kinds}")


def _file_documents(config, source: sources.Source, paths: list[str], shuffle_seed: int | None,
                    checked: bool = True, split: str = "train"):
  """tf.data of the documents in `paths`; with a seed, file order reshuffled each epoch, endless.
  Unchecked: {text, valid, where} records, the UTF-8 policy not yet applied. A single file split
  by document (sources.splits_documents) keeps only `split`'s documents."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fmt = sources.file_format(config, source, paths)
  peek_format(config, source, fmt, paths[0])
  ds = tf.data.Dataset.from_tensor_slices(paths)
  if shuffle_seed is not None:
    # Shuffle before repeat: each epoch is a whole permutation, so no file comes round twice
    # before every other has come once.
    ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
  field, comp = config.data.text_feature, sources.compression(paths[0])
  if fmt == "jsonl":
    docs = _jsonl_files(ds, field, comp)
  elif fmt == "tfrecord":
    docs = _tfrecord_files(ds, field, comp)
  else:
    docs = _text_files(ds)
  if sources.splits_documents(config, source, paths):
    fraction = config.data.eval_fraction
    docs = docs.filter(lambda d: sources.document_in_split(d["text"], split, fraction))
  check_policy(config)
  return _apply_utf8_policy(docs, config.data.invalid_utf8) if checked else docs


# ---------------------------------------------------------------- TFDS

def _tfds_documents(config, source: sources.Source, split: str, process_index: int,
                    process_count: int, shuffle: bool, seed: int = 0, checked: bool = True):
  """This process's slice of TFDS split `split` (files shuffled from `seed` when `shuffle`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = sources.tfds_builder(config, source)
  sources.check_tfds_fields(config, builder, split, source)
  host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                          process_count=process_count)
  read_config = tfds.ReadConfig(
      shuffle_seed=seed, shuffle_reshuffle_each_iteration=shuffle,
      # An in-memory cache of a small train split would also land in every iterator checkpoint.
      try_autocache=False)
  ds = builder.as_dataset(split=host_split, shuffle_files=shuffle, read_config=read_config)
  feature, name = config.data.text_feature, f"{source.spec} ({split})"

  def element(example):
    text = example[feature]
    return {"text": text, "valid": utf8_valid(text), "where": tf.constant(name)}
  docs = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  check_policy(config)
  return _apply_utf8_policy(docs, config.data.invalid_utf8) if checked else docs


# ---------------------------------------------------------------- public

def splits_by_host(config, source: sources.Source, process_count: int) -> bool:
  """Whether each of `process_count` hosts reads its own share of the source's train documents
  (a TFDS slice, or its own files when there are MIN_FILES_PER_PROCESS per host); if not, every
  host reads all of them."""
  if process_count == 1:
    return False
  return source.kind == "tfds" or len(sources.file_split(
      config, "train", source)) >= MIN_FILES_PER_PROCESS * process_count


def train_documents(config, source: sources.Source, process_index: int, process_count: int,
                    seed: int):
  """Endless tf.data of share `process_index` of `process_count` of the train documents (its
  files, or its TFDS slice; 0 of 1 is all of them). `seed` shuffles the file order (TFDS: the
  file and example order) afresh each epoch."""
  if source.kind == "tfds":
    return _tfds_documents(config, source, config.data.train_split, process_index, process_count,
                           shuffle=True, seed=seed).repeat()
  files = sources.file_split(config, "train", source)
  return _file_documents(config, source, files[process_index::process_count], seed)


def all_documents(config, source: sources.Source, split: str, checked: bool = True):
  """tf.data of every document of `split` ('train' or 'eval') in a fixed order, one pass: the
  same on every host (eval batches, `prepare`, tokenizer training). Unchecked: {text, valid,
  where} records, for a caller that applies data.invalid_utf8 itself (and counts)."""
  if source.kind == "tfds":
    tfds_split = config.data.train_split if split == "train" else config.data.eval_split
    return _tfds_documents(config, source, tfds_split, 0, 1, shuffle=False, checked=checked)
  return _file_documents(config, source, sources.file_split(config, split, source), None,
                         checked=checked, split=split)


# check_has_text reads at most this many documents (stopping at the first with text), so a large
# source costs one document at set-up; a source that is all empty beyond it is caught by the
# first batch (pipeline.check_first_batch).
PEEK_DOCUMENTS = 1000


def _train_split_of(config, source: sources.Source) -> tuple[str, bool]:
  """('3 jsonl file(s)' or "split 'train'", whether documents are a field of a record)."""
  if source.kind == "tfds":
    return f"split {config.data.train_split!r}", True
  paths = sources.file_split(config, "train", source)
  fmt = sources.file_format(config, source, paths)
  return f"{len(paths)} {fmt} file(s)", fmt != "text"


def check_has_text(config, source: sources.Source) -> None:
  """Raises ValueError, naming the source, when its train documents hold no text to learn from:
  no documents at all (empty JSONL/TFRecord files, an empty TFDS split), or only empty or
  whitespace-only ones (empty files, empty text fields). Reads documents in order only until the
  first one with text, at most PEEK_DOCUMENTS."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = all_documents(config, source, "train", checked=False).take(PEEK_DOCUMENTS)
  has_text = records.map(lambda d: tf.logical_and(
      d["valid"], tf.strings.length(tf.strings.strip(d["text"])) > 0))
  seen = 0
  try:
    for text in has_text.as_numpy_iterator():
      if text:
        return
      seen += 1
  except tf.errors.OpError:
    return  # a malformed document: the pipeline reports it, naming the file and line
  if seen == PEEK_DOCUMENTS:
    return  # a source this large is checked by its first batch instead
  split, fields = _train_split_of(config, source)
  what = ("no documents" if seen == 0 else
          f"{seen} document(s), all empty, whitespace-only or not UTF-8 text")
  field = f" (field data.text_feature={config.data.text_feature!r})" if seen and fields else ""
  raise ValueError(f"{source.where}: no text to train on: the train split ({split}) holds "
                   f"{what}{field}")


def iterate_train_documents(config, max_docs: int = 0):
  """Yields train documents as Python strings (for tokenizer training): at most max_docs in all,
  shared among a mixture's sources by weight."""
  from foundation.data import mixture  # pylint: disable=g-import-not-at-top
  source_list = mixture.config_sources(config)
  if source_list[0].kind in ("synthetic", "prepared"):
    raise ValueError(f"data.source={config.data.source!r} has no text to train a tokenizer on")
  for source in source_list:
    docs = all_documents(config, source, "train")
    if max_docs:
      docs = docs.take(max(1, round(max_docs * source.weight)))
    for document in docs.as_numpy_iterator():
      yield document.decode("utf-8", errors="replace")
