"""Text sources: which documents make up the train and eval splits.

`config.data.source` is one of
  'embedded'    the Python standard library's .py files (the same corpus on every machine of a
                Python version; no download), each file one document;
  'files:GLOB'  local (or gs://) text files matched by GLOB, each file one document;
  'tfds:NAME'   a prepared TFDS dataset (e.g. 'tfds:lm1b', 'tfds:c4/en'), one example one document;
  'synthetic'   random tokens (see synthetic.py; no documents at all).

File sources are split into train and eval by a stable hash of each file's path relative to the
source root, so every host and every machine agree on the split without talking to each other.
"""

import difflib
import glob
import os
import sysconfig
import zlib

KINDS = ("embedded", "files", "tfds", "synthetic")

# Directory names left out of the embedded corpus: test suites (data files with deliberately odd
# code, 60% of the stdlib's bytes) and whatever third-party packages this interpreter carries.
_EMBEDDED_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def parse_source(source: str) -> tuple[str, str]:
  """'files:a/*.txt' -> ('files', 'a/*.txt'); 'embedded' -> ('embedded', ''). Checks the kind."""
  kind, _, arg = source.partition(":")
  if kind not in KINDS:
    raise ValueError(
        f"data.source={source!r}: unknown kind {kind!r}; use one of 'embedded', 'files:GLOB', "
        f"'tfds:NAME' or 'synthetic'")
  if kind in ("files", "tfds") and not arg:
    example = "files:data/*.txt" if kind == "files" else "tfds:lm1b"
    raise ValueError(f"data.source={source!r}: '{kind}:' needs a glob or name after the colon, "
                     f"e.g. {example!r}")
  return kind, arg


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


def glob_files(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted file paths) matching `pattern` ('**' recurses). Raises when nothing matches."""
  pattern = os.path.expanduser(pattern)
  if "://" in pattern:  # gs://… : TensorFlow's file system layer knows the remote stores.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    paths = [p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p)]
  else:
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f"data.source='files:{pattern}': the glob {pattern!r} matches no files")
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


def file_split(config, split: str) -> list[str]:
  """The sorted file paths of split 'train' or 'eval' for the 'embedded' or 'files:' source."""
  kind, arg = parse_source(config.data.source)
  root, paths = embedded_files() if kind == "embedded" else glob_files(arg)
  train, held_out = split_train_eval(root, paths, config.data.eval_fraction)
  chosen = train if split == "train" else held_out
  if not chosen:
    raise ValueError(
        f"data.source={config.data.source!r}: the {split} split is empty ({len(paths)} files, "
        f"data.eval_fraction={config.data.eval_fraction} holds out {len(held_out)}); add files or "
        f"change data.eval_fraction")
  return chosen


# ---------------------------------------------------------------- TFDS

def tfds_builder(config):
  """The TFDS builder of 'tfds:NAME', with clear errors for an unknown or unprepared dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _, name = parse_source(config.data.source)
  data_dir = config.data.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False),
                                      n=10, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close matches among TFDS datasets"
    where = f" nor in data.tfds_data_dir={data_dir!r}" if data_dir else ""
    raise ValueError(f"data.source={config.data.source!r}: TFDS has no registered dataset "
                     f"{base!r}{where} ({hint})") from None
  if not builder.is_prepared():
    raise ValueError(
        f"data.source={config.data.source!r}: the dataset is not prepared in "
        f"data.tfds_data_dir={config.data.tfds_data_dir or '(TFDS default)'!r} (looked in "
        f"{builder.data_dir}); prepare it once with tfds.builder({name!r}).download_and_prepare() "
        f"or point data.tfds_data_dir at where it is")
  return builder


def _check_tfds_fields(config, builder, split: str) -> None:
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    field = "train_split" if split == config.data.train_split else "eval_split"
    raise ValueError(f"data.{field}={split!r}: dataset {builder.name!r} has splits {splits}")
  features = sorted(builder.info.features.keys())
  if config.data.text_feature not in features:
    raise ValueError(f"data.text_feature={config.data.text_feature!r}: dataset {builder.name!r} "
                     f"has features {features}")


def tfds_documents(config, split: str, process_index: int, process_count: int, shuffle: bool):
  """tf.data.Dataset of tf.string documents: this process's slice of TFDS split `split`.

  Each process reads an equal, disjoint share (tfds.split_for_jax_process). With `shuffle` the
  file order is shuffled from config.seed (and reshuffled each epoch when the caller repeats).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builder(config)
  _check_tfds_fields(config, builder, split)
  host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                          process_count=process_count)
  read_config = tfds.ReadConfig(
      shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=shuffle,
      # An in-memory cache of a small train split would also land in every iterator checkpoint.
      try_autocache=not shuffle)
  ds = builder.as_dataset(split=host_split, shuffle_files=shuffle, read_config=read_config)
  feature = config.data.text_feature
  return ds.map(lambda example: example[feature])


def iterate_train_documents(config, max_docs: int = 0):
  """Yields train-split documents as Python strings (for tokenizer training), at most max_docs."""
  kind, _ = parse_source(config.data.source)
  if kind == "synthetic":
    raise ValueError("data.source='synthetic' has no text to train a tokenizer on")
  count = 0
  if kind == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    documents = tfds.as_numpy(tfds_documents(config, config.data.train_split, 0, 1, shuffle=False))
  else:
    documents = (read_file(p) for p in file_split(config, "train"))
  for document in documents:
    if max_docs and count >= max_docs:
      return
    count += 1
    yield document.decode("utf-8", errors="replace")


def read_file(path: str) -> bytes:
  """The bytes of a local or gs:// file (TensorFlow is imported only for the latter)."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()
