"""What the image and audio classification inputs share: a folder with one sub-folder of
examples per class (`data.source='files:DIR'`) read into memory, the choice of a subset of
classes (`data.classes`), the labels' check against model.num_classes, and a TFDS dataset's class
names.

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


# ---------------------------------------------------------------- labelled sets, any source

def only_classes(data, classes: str, kind: str):
  """The examples of the comma-separated class names `classes` (data.classes; '' keeps all),
  relabelled 0..k-1 in that order: a sub-task of a dataset (transfer to new classes). `data` is
  an in-memory set (a dataclass with per-example arrays, `labels`, `class_names`, `identity`);
  every per-example array is filtered alike."""
  names = [c.strip() for c in classes.split(",") if c.strip()]
  if not names:
    return data
  if kind == "tfds":
    raise ValueError(f"data.classes={classes!r} selects classes of an in-memory source "
                     f"('embedded' or 'files:DIR'); a TFDS source streams all of its classes")
  unknown = [n for n in names if n not in data.class_names]
  if unknown:
    raise ValueError(f"data.classes={classes!r}: {unknown[0]!r} is not a class of the source "
                     f"(its classes: {', '.join(data.class_names)})")
  old = np.asarray([data.class_names.index(n) for n in names])
  keep = np.isin(data.labels, old)
  new_label = {int(o): i for i, o in enumerate(old)}
  labels = np.asarray([new_label[int(l)] for l in data.labels[keep]], np.int32)
  per_example = {f.name: getattr(data, f.name)[keep] for f in dataclasses.fields(data)
                 if isinstance(getattr(data, f.name), np.ndarray)
                 and len(getattr(data, f.name)) == len(data.labels)}
  per_example["labels"] = labels
  return dataclasses.replace(data, **per_example, class_names=tuple(names),
                             identity=f"{data.identity} classes {names}")


def check_labels(config, labels: np.ndarray, class_names, what: str,
                 headless_ok: bool = False) -> None:
  """Labels and class count fit model.num_classes; errors name both numbers. `headless_ok`: a
  model without a head (num_classes 0: masked modelling) does not use the labels."""
  num_classes = int(config.model.get("num_classes", 0))
  if num_classes <= 0 and headless_ok:
    return
  if len(class_names) > num_classes:
    raise ValueError(f"data.source={config.data.source!r} has {len(class_names)} classes but "
                     f"model.num_classes={num_classes}: set --config.model.num_classes="
                     f"{len(class_names)}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = int(labels.max() if labels.max() >= num_classes else labels.min())
    raise ValueError(f"data.source={config.data.source!r}: {what} has label {bad}, outside "
                     f"model.num_classes={num_classes}")


def tfds_names(config, builder) -> tuple[str, ...]:
  """The class names of the TFDS label feature (its ids as strings when it has none)."""
  names = getattr(builder.info.features[config.data.label_feature], "names", None)
  return tuple(names) if names else tuple(str(i) for i in range(config.model.num_classes))
