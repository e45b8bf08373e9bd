"""Image preprocessing ops (tf.data), composed from a config string as big_vision's pp:

  compose("decode|inception_crop(224)|flip_lr|value_range(-1,1)") -> fn(image, seed) -> image

An op is `name` or `name(args)` with Python literal arguments (keywords too); ops run left to
right on one example. Each is a factory in OPS: `factory(*args) -> op(image, seed) -> image`.

Random ops are stateless: `seed` is an int64 [2] tensor per example (`example_seed(config.seed,
epoch, index)`), and op i of the chain draws from fold_in(seed, i). The same example in the same
epoch therefore gets the same pixels in any run, in any order, after any resume.

`mixup` works on a whole batch (mixed images and soft labels), so it is not in the chain; call
`mixup(batch, seed, alpha)` after batching.
"""

from typing import Callable

import tensorflow as tf

from foundation.data import op_chain

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _pair(size) -> tuple[int, int]:
  return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def example_seed(seed: int, epoch, index) -> tf.Tensor:
  """int64 [2]: the seed of example `index` in `epoch` of a run seeded `seed` (tensors allowed)."""
  base = tf.constant([seed, 0x5EED], tf.int64)
  with_epoch = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(with_epoch, tf.cast(index, tf.int64))


# ---------------------------------------------------------------- ops

def decode(channels: int = 3) -> Op:
  """Encoded bytes (JPEG, PNG, GIF, BMP) -> uint8 [H, W, channels]; decoded pixels pass through."""
  def op(image, seed):
    del seed
    if image.dtype != tf.string:
      return image
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image
  return op


def resize(size, method: str = "bilinear") -> Op:
  """Resize to size (int: square, or (height, width)); keeps the input dtype (big_vision)."""
  def op(image, seed):
    del seed
    dtype = image.dtype
    out = tf.image.resize(image, _pair(size), method=method)
    if dtype.is_integer:
      out = tf.clip_by_value(tf.round(out), dtype.min, dtype.max)
    return tf.cast(out, dtype)
  return op


def center_crop(size) -> Op:
  """The central size x size window (offsets (H - h) // 2, (W - w) // 2)."""
  h, w = _pair(size)

  def op(image, seed):
    del seed
    shape = tf.shape(image)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    return image[top:top + h, left:left + w]
  return op


def crop_offsets(shape, size, seed) -> tuple[tf.Tensor, tf.Tensor]:
  """random_crop's window corner: (top, left), uniform over the valid positions."""
  h, w = _pair(size)
  top = tf.random.stateless_uniform([], seed, 0, shape[0] - h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform(
      [], tf.random.experimental.stateless_fold_in(seed, 1), 0, shape[1] - w + 1, dtype=tf.int32)
  return top, left


def random_crop(size) -> Op:
  """A size x size window at a uniformly random position (`crop_offsets`)."""
  h, w = _pair(size)

  def op(image, seed):
    top, left = crop_offsets(tf.shape(image), (h, w), seed)
    return image[top:top + h, left:left + w]
  return op


def inception_crop(size, area_min: float = 5, area_max: float = 100,
                   method: str = "bilinear") -> Op:
  """Inception crop (Szegedy et al. 2015): a random window covering area_min..area_max percent
  of the image, aspect ratio 3/4..4/3, resized to size."""
  resize_op = resize(size, method)

  def op(image, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
        area_range=(area_min / 100, area_max / 100), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])
    return resize_op(crop, seed)
  return op


def flip_lr() -> Op:
  """Mirror left-right with probability 1/2."""
  def op(image, seed):
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  return op


def value_range(lo: float = -1, hi: float = 1, in_min: float = 0, in_max: float = 255) -> Op:
  """float32 pixels mapped linearly from [in_min, in_max] to [lo, hi]."""
  def op(image, seed):
    del seed
    image = tf.cast(image, tf.float32)
    return (image - in_min) / (in_max - in_min) * (hi - lo) + lo
  return op


OPS: dict[str, Callable[..., Op]] = {
    "decode": decode,
    "resize": resize,
    "center_crop": center_crop,
    "random_crop": random_crop,
    "inception_crop": inception_crop,
    "flip_lr": flip_lr,
    "value_range": value_range,
}


# ---------------------------------------------------------------- the chain

def parse(spec: str, field: str = "pp") -> list[tuple[str, tuple, dict]]:
  """'a|b(1, x=2)' -> [('a', (), {}), ('b', (1,), {'x': 2})] over these ops (op_chain.parse)."""
  return op_chain.parse(spec, OPS, field)


def compose(spec: str, field: str = "pp") -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """The op chain of `spec` as one fn(image, seed int64 [2]) -> image."""
  ops = []
  for name, args, kwargs in parse(spec, field):
    try:
      ops.append(OPS[name](*args, **kwargs))
    except TypeError as e:
      raise ValueError(f"{field}={spec!r}: {name}{args or ''}: {e}") from None

  def fn(image, seed):
    image, seed = tf.convert_to_tensor(image), tf.convert_to_tensor(seed, tf.int64)
    for i, op in enumerate(ops):
      image = op(image, tf.random.experimental.stateless_fold_in(seed, i))
    return image
  return fn


def mixup(batch: dict, seed, alpha: float, num_classes: int) -> dict:
  """Batch-level mixup (Zhang et al. 2018), big_vision's form: one ratio r ~ Beta(alpha, alpha)
  for the batch; image = r * image + (1 - r) * image rolled by one row; 'labels' float32
  [B, num_classes] the same mix of the one-hot labels."""
  seed = tf.convert_to_tensor(seed, tf.int64)
  a = tf.random.stateless_gamma([], seed, alpha)
  b = tf.random.stateless_gamma([], tf.random.experimental.stateless_fold_in(seed, 1), alpha)
  ratio = a / (a + b)
  onehot = tf.one_hot(batch["label"], num_classes)
  image = tf.cast(batch["image"], tf.float32)
  return {**batch,
          "image": ratio * image + (1 - ratio) * tf.roll(image, 1, axis=0),
          "labels": ratio * onehot + (1 - ratio) * tf.roll(onehot, 1, axis=0)}
