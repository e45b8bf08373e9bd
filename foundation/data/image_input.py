"""Image classification input: batches {'image': float32 [b, H, W, C], 'label': int32 [b],
'label_mask': int32 [b]} (b = batch_size / process_count) from `data.source`:

  'embedded'    the shapes drawn by shapes.py (offline; data.num_train / data.num_eval images)
  'tfds:NAME'   a prepared TFDS dataset: features data.image_feature / data.label_feature, splits
                data.train_split / data.eval_split, under data.tfds_data_dir
  'files:DIR'   one sub-folder per class (class ids: the sorted folder names) of image files
                (JPEG, PNG, GIF, BMP); eval reads DIR/<data.eval_split>/ when it exists, else holds
                out data.eval_fraction of each class's files (by name hash)

Preprocessing is image_ops chains: data.pp_train on train examples, data.pp_eval on eval ones;
their output must be [image_size, image_size, channels].

Train positions resume exactly. Embedded and files sets live in memory (files: their encoded
bytes) and use examples.EpochIterator: epoch e is a keyed shuffle of the examples, its rows
(index, e); an example's random ops are seeded by (config.seed, e, index), so the position (epoch,
row) is the same for every host count and a resume sees the same pixels. TFDS streams through
tf.data, each host its own shard, and saves tf.data's own iterator checkpoint; its random ops are
seeded by (config.seed, host, position in the host's stream), and resuming on another host count
is refused (as for the LM's per-host TFDS input).

Eval: the first eval.steps * batch_size examples of the eval split, in order, the last batch
padded with label_mask=0 rows; host p takes rows [p*b, (p+1)*b) of each batch, so the rows (and
summed metrics) are the same for any host count (examples.eval_batches).
"""

import dataclasses
import os

import ml_collections
import numpy as np

from foundation.data import class_folders
from foundation.data import examples
from foundation.data import iterators
from foundation.data import shapes
from foundation.data import sources

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def image_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields of image classification (the core places them in configs/)."""
  return ml_collections.ConfigDict(dict(
      source="embedded",       # 'embedded' (shapes.py), 'tfds:NAME' or 'files:DIR'
      image_size=32,           # the model's input: image_size x image_size after pp
      channels=3,
      # image_ops chains (foundation/data/image_ops.py); sizes in them must give image_size.
      pp_train="decode|flip_lr|value_range(-1,1)",
      pp_eval="decode|value_range(-1,1)",
      # Batch mixup (image_ops.mixup) on train batches: Beta(mixup, mixup) ratios; 0 is off. On,
      # every batch (eval too: one-hot) carries 'soft_label' [num_classes] for the loss.
      mixup=0.0,
      classes="",              # embedded/files: keep these comma-separated class names ('' all)
      image_feature="image",   # TFDS feature names
      label_feature="label",
      train_split="train",     # TFDS splits; files: eval_split is the sub-folder of eval images
      eval_split="test",
      tfds_data_dir="",        # where TFDS datasets are prepared; '' means TFDS's default
      eval_fraction=0.1,       # files without an eval_split folder: the share held out per class
      num_train=shapes.NUM_TRAIN,  # embedded: images drawn for train and for eval
      num_eval=shapes.NUM_EVAL,
      shuffle_buffer=10_000,   # TFDS: examples
      prefetch=2,
  ))


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """An in-memory split: `raw` uint8 [N, H, W, C] pixels or object [N] encoded bytes."""
  raw: np.ndarray
  labels: np.ndarray        # int32 [N]
  class_names: tuple[str, ...]
  identity: str             # what the data is, for the resume check


# ---------------------------------------------------------------- sources

def _kind(config) -> tuple[str, str]:
  spec = config.data.source
  kind, _, arg = spec.partition(":")
  if kind not in ("embedded", "tfds", "files") or (kind != "embedded" and not arg):
    raise ValueError(f"data.source={spec!r} is not an image source; use 'embedded', "
                     f"'tfds:NAME' or 'files:DIR'")
  return kind, arg


def _embedded(config, split: str) -> ImageSet:
  count = config.data.num_train if split == "train" else config.data.num_eval
  images, labels = shapes.load(split, 0, int(count), int(config.data.image_size))
  return ImageSet(images, labels, shapes.CLASS_NAMES,
                  f"embedded shapes {config.data.image_size}px {split} {count}")


def _files(config, split: str) -> ImageSet:
  """A class-folder tree read into memory (foundation/data/class_folders.py)."""
  data = class_folders.read(config, split, IMAGE_EXTENSIONS, "images")
  _check_channels(data.raw, data.paths, config)
  return ImageSet(data.raw, data.labels, data.names, data.identity)


def _check_channels(raw: np.ndarray, paths: list[str], config) -> None:
  """Every image decodes, and all have the same channel count (data.channels)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seen = {}
  for path, data in zip(paths, raw):
    try:
      channels = int(tf.io.decode_image(data, expand_animations=False).shape[-1])
    except tf.errors.InvalidArgumentError:
      raise ValueError(f"{path} is not a JPEG, PNG, GIF or BMP image") from None
    seen.setdefault(channels, path)
  if len(seen) > 1:
    which = ", ".join(f"{c} ({p})" for c, p in sorted(seen.items()))
    raise ValueError(f"data.source={config.data.source!r}: images of mixed channel counts: "
                     f"{which}; convert them to data.channels={config.data.channels}")


def _tfds_builder(config):
  _kind(config)
  return sources.checked_tfds_builder(config, ("image_feature", "label_feature"))


def _tfds_dataset(config, builder, split: str):
  """(encoded image bytes, label) pairs of a split, in file order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  image, label = config.data.image_feature, config.data.label_feature
  decoders = None
  if isinstance(builder.info.features[image], tfds.features.Image):
    decoders = {image: tfds.decode.SkipDecoding()}  # the 'decode' op decodes
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  return ds.map(lambda ex: (ex[image], ex[label]))


def _tfds_eval(config, builder) -> ImageSet:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  count = config.eval.steps * config.batch_size
  pairs = list(tfds.as_numpy(_tfds_dataset(config, builder, config.data.eval_split).take(count)))
  raw = np.empty(len(pairs), dtype=object)
  raw[:] = [p[0] for p in pairs]
  if raw.size and not isinstance(raw[0], bytes):
    raw = np.stack(list(raw))  # already pixels (a Tensor feature)
  return ImageSet(raw, np.array([p[1] for p in pairs], np.int32),
                  class_folders.tfds_names(config, builder),
                  f"{config.data.source} {config.data.eval_split}")


def read_split(config, split: str) -> ImageSet:
  """The in-memory 'train' or 'eval' split of an embedded or files source (TFDS: eval only)."""
  kind, _ = _kind(config)
  if kind == "embedded":
    data = _embedded(config, split)
  elif kind == "files":
    data = _files(config, split)
  else:
    data = _tfds_eval(config, _tfds_builder(config))
  data = class_folders.only_classes(data, config.data.get("classes", ""), kind)
  class_folders.check_labels(config, data.labels, data.class_names, f"the {split} split")
  return data


# ---------------------------------------------------------------- preprocessing

class Preprocess:
  """A pp chain applied to a batch of in-memory examples inside one traced tf.function: the ops
  run per example (tf.map_fn), each seeded by example_seed(seed, epoch, index)."""

  def __init__(self, config, spec: str, field: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from foundation.data import image_ops  # pylint: disable=g-import-not-at-top
    size, channels = int(config.data.image_size), int(config.data.channels)
    self.shape = (size, size, channels)
    self.spec, self.field, self.seed = spec, field, int(config.seed)
    chain = image_ops.compose(spec, field)

    def one(args):
      raw, epoch, index = args
      image = chain(raw, image_ops.example_seed(self.seed, epoch, index))
      return tf.cast(image, tf.float32)

    @tf.function
    def batch(raw, epochs, indices):
      return tf.map_fn(one, (raw, epochs, indices), fn_output_signature=tf.float32)
    self._one, self._batch = one, batch

  def check(self, raw_example) -> None:
    """The chain's output on one example has the configured shape."""
    out = self._one((raw_example, np.int64(0), np.int64(0)))
    if tuple(out.shape) != self.shape:
      raise ValueError(f"{self.field}={self.spec!r} gives images of shape {tuple(out.shape)}, "
                       f"not data.image_size x image_size x channels = {self.shape}")

  def __call__(self, raw: np.ndarray, epochs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    if raw.dtype == object:
      raw = raw.astype(bytes)  # a tf.string tensor
    return self._batch(raw, epochs.astype(np.int64), indices.astype(np.int64)).numpy()


MIXUP_SALT = 0x313C  # mixup's seeds differ from the pp chain's, for the same example


def _builder(data: ImageSet, pp: Preprocess, config, mix: bool = False):
  """build(rows) for EpochIterator / eval_batches: rows are (index, epoch) or () (padding).

  With data.mixup > 0 every batch has 'soft_label' (one-hot; `mix`, the train batches: mixed
  with the images, one ratio per batch seeded by its first example, so a resumed run mixes the
  same)."""
  alpha, classes = float(config.data.get("mixup", 0.0)), int(config.model.num_classes)

  def build(rows) -> dict[str, np.ndarray]:
    real = np.array([bool(r) for r in rows])
    index = np.array([r[0] if r else 0 for r in rows], np.int64)
    epoch = np.array([r[1] if r else 0 for r in rows], np.int64)
    batch = {"image": pp(data.raw[index], epoch, index),
             "label": np.where(real, data.labels[index], 0).astype(np.int32),
             "label_mask": real.astype(np.int32)}
    if alpha > 0:
      batch["soft_label"] = np.eye(classes, dtype=np.float32)[batch["label"]]
      if mix:
        from foundation.data import image_ops  # pylint: disable=g-import-not-at-top
        seed = image_ops.example_seed(int(config.seed) ^ MIXUP_SALT, epoch[0], index[0])
        mixed = image_ops.mixup(batch, seed, alpha, classes)
        batch.update(image=mixed["image"].numpy(), soft_label=mixed["labels"].numpy())
    return batch
  return build


# ---------------------------------------------------------------- public

def make_train_iterator(config, process_index: int,
                        process_count: int) -> iterators.DataIterator:
  """This host's endless train batches, with save/restore for exact resume."""
  kind, _ = _kind(config)
  if kind == "tfds":
    return TfdsIterator(config, process_index, process_count)
  data = read_split(config, "train")
  pp = Preprocess(config, config.data.pp_train, "data.pp_train")
  pp.check(data.raw[0])
  count = len(data.labels)

  def plan(epoch: int) -> examples.Rows:
    order = examples.shuffled(count, config.seed, 0, epoch)
    return [(int(i), epoch) for i in order]
  identity = {"data": data.identity, "seed": int(config.seed), "pp_train": config.data.pp_train,
              "image_size": int(config.data.image_size)}
  if config.data.get("mixup", 0.0) > 0:  # (absent when off: older checkpoints resume)
    identity["mixup"] = float(config.data.mixup)
  description = {"sources": [[config.data.source, 1.0]], "position_kind": "image",
                 "process_count": process_count, "num_examples": count}
  return examples.EpochIterator(plan, _builder(data, pp, config, mix=True), config.batch_size,
                                process_index,
                                process_count, identity, description)


def eval_batches(config, process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
  """This host's share of at most eval.steps eval batches (see the module docstring)."""
  data = read_split(config, "eval")
  if not len(data.labels):
    raise ValueError(f"data.source={config.data.source!r}: the eval split is empty")
  pp = Preprocess(config, config.data.pp_eval, "data.pp_eval")
  pp.check(data.raw[0])
  rows = [(i, 0) for i in range(len(data.labels))]
  return examples.eval_batches(rows, _builder(data, pp, config), config, process_index,
                               process_count)


def class_names(config) -> tuple[str, ...]:
  """The source's class names, index = label id."""
  kind, _ = _kind(config)
  if kind == "embedded":
    return shapes.CLASS_NAMES
  if kind == "files":
    directory = config.data.source[len("files:"):]
    names = class_folders.class_names(directory, f"data.source={config.data.source!r}",
                                        "images")
    return tuple(n for n in names if n != config.data.eval_split)
  return class_folders.tfds_names(config, _tfds_builder(config))


class TfdsIterator(iterators.TfDataIterator):
  """A TFDS train split through tf.data, this host's shard; the state is tf.data's checkpoint."""

  def __init__(self, config, process_index: int, process_count: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from foundation.data import pipeline  # pylint: disable=g-import-not-at-top
    self.process_index, self.process_count = process_index, process_count
    host_batch = pipeline.host_batch_size(config, process_count)
    builder = _tfds_builder(config)
    class_folders.check_labels(config, np.zeros(0, np.int32),
                               class_folders.tfds_names(config, builder), "the train split")
    pp = Preprocess(config, config.data.pp_train, "data.pp_train")
    chain, seed, num_classes = pp._one, int(config.seed), int(config.model.num_classes)

    def process(position, pair):
      raw, label = pair
      tf.debugging.assert_less(tf.cast(label, tf.int32), num_classes, message=(
          f"a label of data.source={config.data.source!r} is outside model.num_classes="
          f"{num_classes}"))
      image = chain((raw, tf.constant(process_index, tf.int64), position))
      return {"image": tf.ensure_shape(image, pp.shape), "label": tf.cast(label, tf.int32),
              "label_mask": tf.constant(1, tf.int32)}

    ds = _tfds_dataset(config, builder, config.data.train_split).shard(process_count,
                                                                        process_index)
    # Shuffle after repeat: the buffer flows across epoch ends (no stall at each epoch's tail).
    ds = ds.repeat().enumerate().shuffle(config.data.shuffle_buffer, seed=seed)
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True)
    alpha = float(config.data.get("mixup", 0.0))
    if alpha > 0:  # one ratio per batch, seeded by the batch's number on this host (resumable)
      from foundation.data import image_ops  # pylint: disable=g-import-not-at-top

      def mix(number, batch):
        batch = {**batch, "soft_label": tf.one_hot(batch["label"], num_classes)}
        mixed = image_ops.mixup(batch, image_ops.example_seed(seed ^ MIXUP_SALT, process_index,
                                                              number), alpha, num_classes)
        return {**batch, "image": mixed["image"], "soft_label": mixed["labels"]}
      ds = ds.enumerate().map(mix)
    ds = ds.prefetch(config.data.prefetch)
    ds = ds.with_options(pipeline._options())  # pylint: disable=protected-access
    self._iterator = iter(ds)
    self._description = {"sources": [[config.data.source, 1.0]], "position_kind": "image-tfds",
                         "process_count": process_count}
    self.steps = 0

  def __next__(self) -> dict[str, np.ndarray]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      batch = {k: v.numpy() for k, v in next(self._iterator).items()}
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(e.message.split("\n")[0]) from None
    self.steps += 1
    return batch


def image_from_file(config, path: str) -> np.ndarray:
  """float32 [H, W, C]: an image file through the run's data.pp_eval (the eval images' chain)."""
  if not os.path.isfile(path):
    raise ValueError(f"--image={path!r} is not a file")
  raw = np.empty(1, dtype=object)
  raw[:] = [sources.read_file(path)]
  check_decodes(raw, [path])
  pp = Preprocess(config, config.data.pp_eval, "data.pp_eval")
  pp.check(raw[0])
  return pp(raw, np.zeros(1), np.zeros(1))[0]


def check_decodes(raw: np.ndarray, paths: list[str]) -> None:
  """Every image decodes; the error names the file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for path, data in zip(paths, raw):
    try:
      tf.io.decode_image(data, expand_animations=False)
    except tf.errors.InvalidArgumentError:
      raise ValueError(f"{path} is not a JPEG, PNG, GIF or BMP image (it does not decode)"
                       ) from None
