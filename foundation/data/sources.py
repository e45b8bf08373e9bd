"""Text sources: what a source spec names, which files or TFDS splits it covers, train vs eval.

A source spec (`config.data.source`, or one component of `config.data.mixture`) is one of
  'embedded'       the Python standard library's .py files (the same corpus on every machine of a
                   Python version; no download), each file one document;
  'files:GLOB'     local (or gs://) files matched by GLOB ('**' recurses), read by their format
                   (config.data.file_format; 'auto' goes by extension): text (each file one
                   document), JSONL (each line one document, its `data.text_feature` field) or
                   TFRecord of tf.train.Example (each record one document, the bytes feature
                   `data.text_feature`); '.gz' files are read compressed;
  'tfds:NAME'      a prepared TFDS dataset (e.g. 'tfds:lm1b', 'tfds:c4/en'), an example a document;
  'prepared:DIR'   tokens written by `python -m foundation.data.prepare` (see prepared.py);
  'synthetic'      random tokens (see synthetic.py; no documents at all).

File sources are split into train and eval by a stable hash of each file's path relative to the
source root, so every host and every machine agree on the split without talking to each other.
This module lists and checks; it builds no tf.data (documents.py does) and imports no TensorFlow
except to reach gs:// paths and TFDS.
"""

import dataclasses
import difflib
import glob
import os
import sysconfig
import zlib

KINDS = ("embedded", "files", "tfds", "prepared", "synthetic")
FILE_FORMATS = ("auto", "text", "jsonl", "tfrecord")

# Directory names left out of the embedded corpus: test suites (data files with deliberately odd
# code, 60% of the stdlib's bytes) and whatever third-party packages this interpreter carries.
_EMBEDDED_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of documents (or of prepared tokens) and its share of a mixture.

  `where` names it in error messages the way the user typed it: "data.source='files:a/*.txt'"
  or "data.mixture source 'files:a/*.txt'".
  """
  spec: str
  kind: str
  arg: str
  weight: float = 1.0
  where: str = ""


def parse_source(spec: str, where: str = "") -> Source:
  """'files:a/*.txt' -> Source(kind='files', arg='a/*.txt'). Checks the kind and the argument."""
  where = where or f"data.source={spec!r}"
  kind, _, arg = spec.partition(":")
  if kind not in KINDS:
    raise ValueError(
        f"{where}: unknown kind {kind!r}; use one of 'embedded', 'files:GLOB', 'tfds:NAME', "
        f"'prepared:DIR' or 'synthetic'")
  if kind in ("files", "tfds", "prepared") and not arg:
    example = {"files": "files:data/*.txt", "tfds": "tfds:lm1b", "prepared": "prepared:/data/p"}
    raise ValueError(f"{where}: '{kind}:' needs a glob, name or folder after the colon, e.g. "
                     f"{example[kind]!r}")
  return Source(spec=spec, kind=kind, arg=arg, where=where)


# ---------------------------------------------------------------- file sources

def embedded_files() -> tuple[str, list[str]]:
  """(root, sorted .py paths) of the standard library, test suites and site-packages excluded."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EMBEDDED_SKIP_DIRS]
    paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  return root, sorted(paths)


def glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard: 'a/b/*/c.txt' -> 'a/b'."""
  parts = pattern.split("/")
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return "/".join(fixed) or "."


def glob_files(pattern: str, where: str = "") -> tuple[str, list[str]]:
  """(root, sorted file paths) matching `pattern` ('**' recurses). Raises when nothing matches."""
  pattern = os.path.expanduser(pattern)
  if "://" in pattern:  # gs://… : TensorFlow's file system layer knows the remote stores.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    paths = [p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)]
  else:
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    where = where or f"data.source='files:{pattern}'"
    raise ValueError(f"{where}: the glob {pattern!r} matches no files")
  return glob_root(pattern), sorted(paths)


def _eval_hash(relative_path: str) -> float:
  """A stable number in [0, 1) per path: crc32 is the same on every machine and Python run."""
  return zlib.crc32(relative_path.encode("utf-8")) / 2**32


def split_train_eval(root: str, paths: list[str],
                     eval_fraction: float) -> tuple[list[str], list[str]]:
  """Splits `paths` (sorted) into disjoint (train, eval) lists by the hash of each path under root.

  A path is held out when its hash is below `eval_fraction`. When that holds out nothing although
  eval_fraction > 0 and there are at least two files, the file with the smallest hash is held out
  so that small corpora still evaluate (still a pure function of the paths: the same everywhere).
  """
  hashes = {p: _eval_hash(os.path.relpath(p, root).replace(os.sep, "/")) for p in paths}
  held_out = {p for p in paths if hashes[p] < eval_fraction}
  if not held_out and eval_fraction > 0 and len(paths) >= 2:
    held_out = {min(paths, key=lambda p: (hashes[p], p))}
  return [p for p in paths if p not in held_out], [p for p in paths if p in held_out]


def splits_documents(config, source: Source, paths: list[str]) -> bool:
  """Whether the source's train/eval split is by document instead of by file: one JSONL or
  TFRecord file (many documents, no second file to hold out) with data.eval_fraction > 0."""
  return (len(paths) == 1 and config.data.eval_fraction > 0
          and file_format(config, source, paths) in ("jsonl", "tfrecord"))


def document_in_split(text, split: str, eval_fraction: float):
  """tf bool: whether a document (tf.string) of a document-split file belongs to `split`: held
  out for eval when its FarmHash fingerprint falls below eval_fraction (the same on every host
  and run)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  buckets = 1 << 30
  held_out = tf.strings.to_hash_bucket_fast(text, buckets) < int(eval_fraction * buckets)
  return held_out if split == "eval" else tf.logical_not(held_out)


def file_split(config, split: str, source: Source | None = None) -> list[str]:
  """The sorted file paths of split 'train' or 'eval' of an 'embedded' or 'files:' source
  (by default config.data.source). A single JSONL/TFRecord file is in both splits: its
  documents are split instead (splits_documents)."""
  source = source or parse_source(config.data.source)
  root, paths = (embedded_files() if source.kind == "embedded"
                 else glob_files(source.arg, source.where))
  file_format(config, source, paths)  # one format for the whole glob, whichever split is read
  if splits_documents(config, source, paths):
    return paths
  train, held_out = split_train_eval(root, paths, config.data.eval_fraction)
  chosen = train if split == "train" else held_out
  if not chosen:
    raise ValueError(
        f"{source.where}: the {split} split is empty ({len(paths)} files, "
        f"data.eval_fraction={config.data.eval_fraction} holds out {len(held_out)}); add files or "
        f"change data.eval_fraction")
  return chosen


def _format_of_name(path: str) -> str:
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  if ".tfrecord" in os.path.basename(name) or name.endswith(".tfrec"):
    return "tfrecord"
  return "text"


def file_format(config, source: Source, paths: list[str]) -> str:
  """'text', 'jsonl' or 'tfrecord': config.data.file_format, or by extension when it is 'auto'."""
  chosen = config.data.file_format
  if chosen not in FILE_FORMATS:
    raise ValueError(f"data.file_format={chosen!r} is not one of {FILE_FORMATS}")
  if source.kind == "embedded" or chosen != "auto":
    return "text" if source.kind == "embedded" else chosen
  found = {}
  for path in paths:
    found.setdefault(_format_of_name(path), path)
  if len(found) > 1:
    examples = ", ".join(f"{f} ({os.path.basename(p)})" for f, p in sorted(found.items()))
    raise ValueError(f"{source.where}: the glob matches files of several formats: {examples}; "
                     f"give each format its own source (data.mixture) or set data.file_format")
  return next(iter(found))


def compression(path: str) -> str:
  """tf.data's compression_type for a path: 'GZIP' for .gz, else ''."""
  return "GZIP" if path.endswith(".gz") else ""


# ---------------------------------------------------------------- TFDS

def tfds_builder(config, source: Source | None = None):
  """The TFDS builder of 'tfds:NAME', with clear errors for an unknown or unprepared dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = source or parse_source(config.data.source)
  name = source.arg
  data_dir = config.data.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False),
                                      n=10, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close matches among TFDS datasets"
    there = f" nor in data.tfds_data_dir={data_dir!r}" if data_dir else ""
    raise ValueError(f"{source.where}: TFDS has no registered dataset {base!r}{there} ({hint})"
                     ) from None
  if not builder.is_prepared():
    raise ValueError(
        f"{source.where}: the dataset is not prepared in "
        f"data.tfds_data_dir={config.data.tfds_data_dir or '(TFDS default)'!r} (looked in "
        f"{builder.data_dir}); prepare it once with tfds.builder({name!r}).download_and_prepare() "
        f"or point data.tfds_data_dir at where it is")
  return builder


def checked_tfds_builder(config, feature_fields: tuple[str, ...]):
  """The prepared TFDS builder of data.source='tfds:NAME', after checking that data.train_split
  and data.eval_split are its splits and that each data.<feature_fields> names a feature ('a/b':
  a nested one); the errors list what the dataset has. The image, audio and image-text inputs'."""
  name = config.data.source.partition(":")[2]
  source = Source(spec=config.data.source, kind="tfds", arg=name,
                  where=f"data.source={config.data.source!r}")
  builder = tfds_builder(config, source)
  splits = sorted(builder.info.splits.keys())
  for field in ("train_split", "eval_split"):
    if config.data[field] not in splits:
      raise ValueError(f"data.{field}={config.data[field]!r}: dataset {builder.name!r} has "
                       f"splits {splits}")
  features = builder.info.features
  for field in feature_fields:
    node = features
    for part in config.data[field].split("/"):
      if not hasattr(node, "keys") or part not in node.keys():
        raise ValueError(f"data.{field}={config.data[field]!r}: dataset {builder.name!r} has "
                         f"features {sorted(features.keys())}")
      node = node[part]
  return builder


def check_tfds_fields(config, builder, split: str, source: Source) -> None:
  """The split and the text feature exist; the errors list the ones that do."""
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    field = "train_split" if split == config.data.train_split else "eval_split"
    raise ValueError(f"data.{field}={split!r}: dataset {builder.name!r} ({source.where}) has "
                     f"splits {splits}")
  features = sorted(builder.info.features.keys())
  if config.data.text_feature not in features:
    raise ValueError(f"data.text_feature={config.data.text_feature!r}: dataset {builder.name!r} "
                     f"({source.where}) has features {features}")


def read_file(path: str) -> bytes:
  """The bytes of a local or gs:// file (TensorFlow is imported only for the latter)."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()
