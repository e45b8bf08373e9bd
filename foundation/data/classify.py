r"""Sequence-classification data: (text, label) examples -> one right-padded row per example.

Sources (`classify.train_path`, `classify.eval_path`):
  FILE or GLOB of .csv   a header row naming the columns; `classify.text_field` and
                         `classify.label_field` pick the text and the label;
  FILE or GLOB of .jsonl one object a line with those two fields;
  'tfds:NAME'            a TFDS text-classification dataset already prepared on this machine
                         (e.g. 'tfds:imdb_reviews', 'tfds:glue/sst2'), splits `classify.train_split`
                         and `classify.eval_split`, under data.tfds_data_dir.
Every host reads the whole set once (fine-tuning sets are small); no TensorFlow except for TFDS.

Labels: `classify.labels` ('neg,pos') fixes the names and their ids in that order; otherwise
integer labels are their own ids (names '0', '1', ...) and string labels take ids in sorted
order (over train and eval together). A TFDS ClassLabel brings its own names. The number of
classes must equal model.num_classes (the head's width). The trainer prints the mapping at start
and keeps it in WORKDIR/labels.json ({"labels": [name of id 0, name of id 1, ...]}, beside
config.json), where `evaluate` and `generate` read the names back (`read_labels`).

A row is [bos] + text ids + [eos], cut to seq_len by dropping text from the end
(classify.truncate='right', the default: keep the start) or from the start ('left': keep the
end); the head reads the hidden state at the eos (`last_index`).

Batch: int32 inputs, positions, segment_ids [B, seq_len] (segment 1 on the example, 0 on padding)
and int32 labels, last_index, label_mask [B] (label_mask 0 on eval padding rows).
"""

import csv
import io
import json
import os
import re

import numpy as np

from foundation.data import examples as examples_lib
from foundation.data import sources
from foundation.data import tokenizers

TRUNCATE = ("right", "left")
_STREAM = 11  # the Feistel key stream of the classification shuffle
_INT = re.compile(r"-?\d+")


# ---------------------------------------------------------------- reading

def read_csv(paths: list[str], text_field: str, label_field: str) -> list[examples_lib.Record]:
  """Records {'text', 'label'} of CSV files with a header; errors name file:line and columns."""
  records = []
  for path in paths:
    text = sources.read_file(path).decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [f for f in (text_field, label_field) if f not in header]
    if missing:
      raise ValueError(f"{path}: the CSV header has no column {missing[0]!r} "
                       f"(classify.text_field={text_field!r}, classify.label_field="
                       f"{label_field!r}); its columns are {header}")
    start = 2
    for row in reader:
      where = f"{path}:{start}"
      start = reader.line_num + 1
      if not any(isinstance(v, str) and v.strip() for v in row.values()):
        continue
      if row[text_field] is None or row[label_field] in (None, ""):
        raise ValueError(f"{where}: the row has no {label_field!r} or {text_field!r} value: {row}")
      raw = f"{row[text_field]}\0{row[label_field]}".encode()
      value = {"text": row[text_field], "label": row[label_field]}
      records.append(examples_lib.Record(where, value, examples_lib.record_hash(raw)))
  return records


def _jsonl_records(paths: list[str], text_field: str,
                   label_field: str) -> list[examples_lib.Record]:
  records = examples_lib.read_jsonl(paths)
  for r in records:
    value = r.value
    label = value.get(label_field) if isinstance(value, dict) else None
    if (not isinstance(value, dict) or not isinstance(value.get(text_field), str)
        or not isinstance(label, (int, str)) or isinstance(label, bool)):
      keys = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise ValueError(f"{r.where}: a record needs a string {text_field!r} "
                       f"(classify.text_field) and an int or string {label_field!r} "
                       f"(classify.label_field); it has {keys}")
  return [examples_lib.Record(r.where, {"text": r.value[text_field], "label": r.value[label_field]},
                              r.hash) for r in records]


def read_files(pattern: str, field: str, c) -> tuple[list[examples_lib.Record], list[str]]:
  """(records, paths) of a CSV or JSONL glob; the format goes by extension."""
  paths = examples_lib.glob_paths(pattern, field)
  formats = {_format(p) for p in paths}
  if len(formats) > 1 or None in formats:
    odd = [os.path.basename(p) for p in paths if _format(p) is None][:3]
    raise ValueError(f"{field}={pattern!r}: the files must all be .csv or all .jsonl"
                     f"{f' (not {odd})' if odd else ''}")
  if formats == {"csv"}:
    return read_csv(paths, c.text_field, c.label_field), paths
  return _jsonl_records(paths, c.text_field, c.label_field), paths


def _format(path: str) -> str | None:
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith(".csv"):
    return "csv"
  if name.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  return None


def _tfds_builder(config, spec: str, field: str):
  """The prepared TFDS builder; an unprepared or unknown one is an error that also lists what is
  prepared in the data folder."""
  source = sources.Source(spec=spec, kind="tfds", arg=spec[len("tfds:"):],
                          where=f"{field}={spec!r}")
  try:
    return sources.tfds_builder(config, source)
  except ValueError as e:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = config.data.tfds_data_dir or tfds.core.constants.DATA_DIR
    folder = os.path.expanduser(data_dir)
    there = sorted(n for n in os.listdir(folder) if n != "downloads") if os.path.isdir(folder) else []
    raise ValueError(f"{e}. Prepared in {data_dir}: {there or 'nothing'}") from None


def read_tfds(config, spec: str, split: str, field: str) -> tuple[list[examples_lib.Record],
                                                                   list[str] | None]:
  """(records, label names or None) of a TFDS split, read whole."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  c = config.classify
  builder = _tfds_builder(config, spec, field)
  splits, features = sorted(builder.info.splits.keys()), builder.info.features
  if split not in splits:
    raise ValueError(f"{field}={spec!r}: split {split!r} (classify.train_split / eval_split) is "
                     f"not one of {splits}")
  for name, what in ((c.text_field, "text_field"), (c.label_field, "label_field")):
    if name not in features:
      raise ValueError(f"classify.{what}={name!r}: {spec} has features {sorted(features)}")
  names = getattr(features[c.label_field], "names", None)
  records = []
  for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
    text = ex[c.text_field].decode("utf-8", errors="replace")
    label = int(ex[c.label_field])
    records.append(examples_lib.Record(f"{spec} ({split}) example {i}",
                                       {"text": text, "label": label},
                                       examples_lib.record_hash(f"{i}".encode())))
  return records, names


def read_splits(config) -> tuple[list, list, list[str] | None, str]:
  """(train records, eval records, label names from the source or None, data identity)."""
  c = config.classify
  if not c.train_path:
    raise ValueError("classify.train_path is empty: give a CSV or JSONL file (or glob) of "
                     "text,label examples, or 'tfds:NAME'")
  if c.train_path.startswith("tfds:"):
    train, names = read_tfds(config, c.train_path, c.train_split, "classify.train_path")
    evals, _ = read_tfds(config, c.eval_path or c.train_path, c.eval_split,
                         "classify.eval_path" if c.eval_path else "classify.train_path")
    return train, evals, names, f"{c.train_path}/{c.train_split}/{c.eval_split}"
  records, paths = read_files(c.train_path, "classify.train_path", c)
  if not records:
    raise ValueError(f"classify.train_path={c.train_path!r}: the files hold no examples")
  if c.eval_path:
    evals, eval_paths = read_files(c.eval_path, "classify.eval_path", c)
    return records, evals, None, examples_lib.data_sha256(paths + eval_paths)
  train, evals = examples_lib.hash_split(records, c.eval_fraction,
                                         f"classify.train_path={c.train_path!r}")
  return train, evals, None, examples_lib.data_sha256(paths)


# ---------------------------------------------------------------- labels

def label_names(config, records: list, source_names: list[str] | None) -> list[str]:
  """The class names, index = id; checked against model.num_classes."""
  c, num_classes = config.classify, config.model.num_classes
  if c.labels:
    names = [n.strip() for n in c.labels.split(",")]
    origin = f"classify.labels={c.labels!r}"
  elif source_names:
    names, origin = list(source_names), "the dataset's label feature"
  elif all(isinstance(v, int) or _INT.fullmatch(v.strip()) for v in _labels(records)):
    top = max(int(v) for v in _labels(records))
    names, origin = [str(i) for i in range(max(top + 1, num_classes))], "the integer labels"
  else:
    names = sorted({str(v).strip() for v in _labels(records)})
    origin = "the distinct string labels"
  if len(names) != num_classes:
    raise ValueError(f"{origin} give {len(names)} classes {names[:20]} but model.num_classes="
                     f"{num_classes}: set --config.model.num_classes={len(names)}")
  return names


def _labels(records: list):
  return (r.value["label"] for r in records)


def label_id(value, names: list[str], where: str) -> int:
  """The id of a label: the index of its text in `names`, else the integer it is."""
  text = str(value).strip()
  if text in names:
    return names.index(text)
  if _INT.fullmatch(text) and 0 <= int(text) < len(names):
    return int(text)
  raise ValueError(f"{where}: label {value!r} is not one of the {len(names)} classes {names[:20]}"
                   f" (ids 0..{len(names) - 1})")


LABELS_FILE = "labels.json"


def store_labels(names: list[str], workdir: str, write: bool) -> None:
  """Keeps the label names (index = id) in WORKDIR/labels.json (written when `write`, on one
  process, atomically). Once checkpoints exist the file belongs to them: other names are then an
  error, and the file is never replaced; before that it is simply replaced."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / LABELS_FILE
  stored = read_labels(workdir)
  if stored == names:
    return
  folder = epath.Path(workdir) / "checkpoints"
  if stored is not None and folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()):
    raise ValueError(f"{path} holds the labels {stored[:20]} of this workdir's checkpoints, but "
                     f"this run's data gives {names[:20]}: fix classify.* or use a new --workdir")
  if not write:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / f".{LABELS_FILE}.partial"
  partial.write_text(json.dumps({"labels": list(names)}, indent=1) + "\n")
  partial.replace(path)


def read_labels(workdir: str) -> list[str] | None:
  """The label names kept in WORKDIR/labels.json (index = id), or None when there is no file."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / LABELS_FILE
  if not path.exists():
    return None
  try:
    names = json.loads(path.read_text())["labels"]
  except (json.JSONDecodeError, KeyError, TypeError):
    names = None
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path} is not a labels file: it must be {{\"labels\": [\"name\", ...]}}")
  return names


def describe_labels(names: list[str]) -> str:
  """'labels: 0=neg, 1=pos' (the first 20)."""
  shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:20]))
  return f"labels: {shown}{f', ... ({len(names)} in all)' if len(names) > 20 else ''}"


# ---------------------------------------------------------------- rows -> batches

def encode(tokenizer, text: str, seq_len: int, truncate: str) -> np.ndarray:
  """[bos] + ids + [eos], at most seq_len tokens: text is dropped from the end ('right') or the
  start ('left'); the eos always stays (the head reads it)."""
  ids = tokenizer.encode(text)
  room = seq_len - 2
  if len(ids) > room:
    ids = ids[:room] if truncate == "right" else ids[len(ids) - room:]
  return np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)


def build_batch(tokens: list[np.ndarray], labels: np.ndarray, rows: examples_lib.Rows,
                seq_len: int) -> dict[str, np.ndarray]:
  """Rows (1-tuples of example indices; () is a padding row) -> the classification batch."""
  n = len(rows)
  batch = {name: np.zeros((n, seq_len), np.int32) for name in ("inputs", "positions",
                                                                "segment_ids")}
  batch.update({name: np.zeros((n,), np.int32) for name in ("labels", "last_index",
                                                            "label_mask")})
  for r, row in enumerate(rows):
    if not row:
      continue
    ids = tokens[row[0]]
    k = len(ids)
    batch["inputs"][r, :k] = ids
    batch["positions"][r, :k] = np.arange(k)
    batch["segment_ids"][r, :k] = 1
    batch["labels"][r] = labels[row[0]]
    batch["last_index"][r] = k - 1
    batch["label_mask"][r] = 1
  return batch


# ---------------------------------------------------------------- public

class ClassifyData:
  """The tokenized train and eval examples of a config, and their label names."""

  def __init__(self, config):
    c = config.classify
    if c.truncate not in TRUNCATE:
      raise ValueError(f"classify.truncate={c.truncate!r} is not one of {TRUNCATE}")
    if config.model.num_classes <= 0:
      raise ValueError(f"model.num_classes={config.model.num_classes}: a classifier needs at "
                       f"least 2 classes (--config.model.num_classes=N)")
    self.tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
    tokenizers.check_vocab_size(self.tokenizer, config)
    train, evals, source_names, self.identity = read_splits(config)
    self.names = label_names(config, train + evals, source_names)
    self.train = self._encode(config, train)
    if all(len(t) <= 2 for t in self.train[0]):  # [bos, eos]: nothing to classify
      raise ValueError(f"classify.train_path={c.train_path!r}: no text to classify: the text "
                       f"field {c.text_field!r} is empty in all {len(train)} train examples")
    self.eval = self._encode(config, evals)

  def _encode(self, config, records: list) -> tuple[list[np.ndarray], np.ndarray]:
    c = config.classify
    tokens = [encode(self.tokenizer, r.value["text"], config.seq_len, c.truncate) for r in records]
    labels = np.asarray([label_id(r.value["label"], self.names, r.where) for r in records],
                        np.int32)
    return tokens, labels


def make_classify_iterator(config, process_index: int, process_count: int,
                           data: ClassifyData | None = None) -> examples_lib.EpochIterator:
  """This host's endless classification batches (see the module docstring), examples shuffled
  afresh each epoch; the position is global, so it resumes on any host count."""
  data = data or ClassifyData(config)
  tokens, labels = data.train
  count = len(tokens)

  def plan(epoch: int) -> examples_lib.Rows:
    return [(int(i),) for i in examples_lib.shuffled(count, config.seed, _STREAM, epoch)]

  from foundation.data import pipeline  # pylint: disable=g-import-not-at-top
  description = pipeline.describe(config, data.tokenizer, [], process_count, "classify")
  description.update(sources=[[f"classify:{config.classify.train_path}", 1.0]],
                     labels=data.names)
  identity = {"data": data.identity, "examples": count, "seed": config.seed,
              "seq_len": config.seq_len, "labels": data.names,
              "tokenizer_sha256": tokenizers.fingerprint(data.tokenizer)["sha256"]}
  return examples_lib.EpochIterator(
      plan, lambda rows: build_batch(tokens, labels, rows, config.seq_len), config.batch_size,
      process_index, process_count, identity, description)


def make_classify_eval_batches(config, process_index: int, process_count: int,
                               data: ClassifyData | None = None) -> list[dict[str, np.ndarray]]:
  """This host's share of at most eval.steps eval batches in order, the last padded with
  label_mask=0 rows; the same number on every host and the same rows for any host count."""
  data = data or ClassifyData(config)
  tokens, labels = data.eval
  if not tokens:
    raise ValueError(f"classify: no eval examples (classify.eval_path="
                     f"{config.classify.eval_path!r}, classify.eval_fraction="
                     f"{config.classify.eval_fraction}); give an eval file or set eval.every=0")
  rows = [(i,) for i in range(len(tokens))]
  return examples_lib.eval_batches(
      rows, lambda r: build_batch(tokens, labels, r, config.seq_len), config, process_index,
      process_count)
