"""A workdir's self-describing config.json, and the paths in it that must travel with the folder.

A workdir (a training run's, or one made by `python -m foundation.hf import`) keeps copies of the
files it needs: its tokenizer (WORKDIR/tokenizer.model, or tokenizer.json and
tokenizer_config.json; see foundation/data/tokenizers.py store_tokenizer). config.json names such
files RELATIVE to the workdir ("tokenizer.json"), so a moved or copied workdir still finds them,
and a run fine-tuned from another workdir names its own copy, not its base's.

  `portable(config, workdir)`  before writing config.json: paths of files kept inside the
                               workdir become relative to it;
  `resolve(config, workdir)`   after reading it: those paths become usable paths again;
  `resolve_tokenizer(name, workdir)` one data.tokenizer value, the same way (also for the trainer:
                               a run resumed after its tokenizer file moved uses its own copy).

Older config.json files hold absolute paths; when such a path no longer exists and the workdir
holds a copy of the same kind, the copy is used. No import of configs/ here (generate.load_config
merges today's defaults for the run's size).
"""

import json
import os

# The copies a workdir may hold of its tokenizer, by data.tokenizer kind: a tokenizer.json (with
# tokenizer_config.json beside it) or a SentencePiece model. (tokenizers.WORKDIR_FILES writes them.)
TOKENIZER_COPIES = {"json": "tokenizer.json", "sentencepiece": "tokenizer.model"}
CONFIG = "config.json"


def _local(path: str) -> bool:
  return "://" not in path


def _exists(path: str) -> bool:
  if _local(path):
    return os.path.isfile(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile.exists(path)


def _join(workdir: str, name: str) -> str:
  return f"{workdir.rstrip('/')}/{name}" if not _local(workdir) else os.path.join(workdir, name)


def _copy_of(name: str, workdir: str) -> str:
  """WORKDIR's copy of a tokenizer of `name`'s kind (tokenizer.json or tokenizer.model)."""
  kind = "json" if name.endswith(".json") else "sentencepiece"
  return _join(workdir, TOKENIZER_COPIES[kind])


def resolve_tokenizer(name: str, workdir: str) -> str:
  """A usable data.tokenizer for a run in `workdir`: 'byte' as is; a relative path that names a
  file inside the workdir -> that file; a path that exists -> as is; a path that no longer exists
  (the workdir was moved, the original deleted) -> the workdir's own copy of that kind, when it
  has one. Otherwise `name` unchanged (make_tokenizer then says "no such tokenizer file")."""
  if not name or name == "byte" or not workdir:
    return name
  if _local(name) and not os.path.isabs(name) and _exists(_join(workdir, name)):
    return _join(workdir, name)
  if _exists(name):
    return name
  copy = _copy_of(name, workdir)
  return copy if _exists(copy) else name


def portable(config: dict, workdir: str) -> dict:
  """config (a plain dict) for WORKDIR/config.json: a data.tokenizer file kept in the workdir is
  named relative to it ('tokenizer.json'); so is a tokenizer elsewhere whose copy the workdir
  holds (identical bytes), or one that no longer exists while the copy does (resolve_tokenizer).
  Returns a new dict; `config` is left alone. Comparing two configs' portable forms tells whether
  they name the same files (checkpoint.check_same_run)."""
  config = json.loads(json.dumps(config, default=str))
  data = config.get("data")
  name = data.get("tokenizer") if isinstance(data, dict) else None
  if not name or name == "byte":
    return config
  resolved = resolve_tokenizer(name, workdir)
  inside = _inside(resolved, workdir)
  copy = _copy_of(name, workdir)
  if inside is not None:
    data["tokenizer"] = inside
  elif _local(copy) and _exists(copy) and _exists(resolved) and _same_bytes(copy, resolved):
    data["tokenizer"] = os.path.basename(copy)
  return config


def _inside(path: str, workdir: str) -> str | None:
  """`path` relative to `workdir` when it lies inside it (local paths only), else None."""
  if not (_local(path) and _local(workdir)):
    return None
  full, root = os.path.realpath(path), os.path.realpath(workdir)
  if os.path.commonpath([full, root]) != root or full == root:
    return None
  return os.path.relpath(full, root)


def _same_bytes(a: str, b: str) -> bool:
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def read(workdir: str) -> dict:
  """WORKDIR/config.json as a plain dict (paths as stored); one-line errors for a folder that is
  not a workdir or a config.json that is not JSON."""
  path = _join(workdir, CONFIG)
  if not _exists(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a training run's workdir "
                            f"(or one made by `python -m foundation.hf import`)")
  if _local(path):
    with open(path, "rb") as f:
      raw = f.read()
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, "rb") as f:
      raw = f.read()
  try:
    saved = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e})") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a config object")
  return saved


def resolve(config: dict, workdir: str) -> dict:
  """The paths of a workdir's config (a plain dict, changed in place and returned) made usable
  from the current directory: data.tokenizer (see resolve_tokenizer)."""
  data = config.get("data")
  if isinstance(data, dict) and data.get("tokenizer"):
    data["tokenizer"] = resolve_tokenizer(data["tokenizer"], workdir)
  return config
