"""A folder with one sub-folder of examples per class (`data.source='files:DIR'`), read into
memory: the image and audio inputs share it.

The eval split is DIR/<data.eval_split> when that folder exists, else the files whose name hash
falls under data.eval_fraction (per class, stable across runs and machines).
"""

import dataclasses
import hashlib
import os

import numpy as np

from foundation.data import examples
from foundation.data import sources


@dataclasses.dataclass(frozen=True)
class Split:
  paths: list[str]
  raw: np.ndarray            # object [N]: each file's bytes
  labels: np.ndarray         # int32 [N]
  names: tuple[str, ...]     # class names, index = label
  identity: str              # what the data is, for the resume check


def class_names(directory: str, field: str, what: str) -> list[str]:
  """The sorted class sub-folders of `directory`; `what` names the examples ('images')."""
  if not os.path.isdir(directory):
    raise ValueError(f"{field}: {directory!r} is not a folder")
  names = sorted(n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))
  if not names:
    raise ValueError(f"{field}: {directory!r} has no class sub-folders (one folder of {what} per "
                     f"class)")
  return names


def read(config, split: str, extensions: tuple[str, ...], what: str) -> Split:
  """The `split` ('train' or 'eval') of the class-folder tree data.source names; files are those
  ending in `extensions`. Errors name data.source and the folder."""
  directory = config.data.source[len("files:"):]
  field = f"data.source={config.data.source!r}"
  eval_dir = os.path.join(directory, config.data.eval_split)
  separate_eval = os.path.isdir(eval_dir)
  names = [n for n in class_names(directory, field, what) if n != config.data.eval_split]
  root = eval_dir if split == "eval" and separate_eval else directory
  paths, labels = [], []
  for label, name in enumerate(names):
    folder = os.path.join(root, name)
    files = (sorted(n for n in os.listdir(folder) if n.lower().endswith(extensions))
             if os.path.isdir(folder) else [])
    if not files and root == directory:
      raise ValueError(f"{field}: class folder {folder!r} holds no {what} "
                       f"({', '.join(extensions)})")
    if not separate_eval:
      held = [examples.record_hash(f"{name}/{f}".encode()) < config.data.eval_fraction
              for f in files]
      files = [f for f, h in zip(files, held) if h == (split == "eval")]
    paths += [os.path.join(folder, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise ValueError(f"{field}: no {split} {what} (data.eval_fraction="
                     f"{config.data.eval_fraction}, no {eval_dir!r} folder)")
  raw = np.empty(len(paths), dtype=object)
  raw[:] = [sources.read_file(p) for p in paths]
  digest = hashlib.sha256("\n".join(os.path.relpath(p, directory) for p in paths).encode())
  return Split(paths, raw, np.array(labels, np.int32), tuple(names),
               f"{config.data.source} {split} {len(paths)} sha256:{digest.hexdigest()[:16]}")
