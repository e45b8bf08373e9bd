"""The embedded image set: ten kinds of shape drawn in numpy, so image runs work offline.

Each image is one shape (CLASS_NAMES) of a random colour, size and position on a random
background colour, plus Gaussian pixel noise; uint8 [size, size, 3]. Everything is a pure function
of (seed, split): numpy's PCG64 streams are fixed across versions and machines. Train and eval
come from different streams, so no eval image is a train image.

The default counts let the `tiny` ViT reach over 90% held-out top-1 in a few CPU minutes (see
tests/test_vit.py and docs).
"""

import functools

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "plus", "ring", "frame", "diamond", "x",
               "hbar", "vbar")
NUM_CLASSES = len(CLASS_NAMES)
NUM_TRAIN = 20_000
NUM_EVAL = 1_000
IMAGE_SIZE = 32
_SPLITS = {"train": 0, "eval": 1}


def _mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """bool: the shape `kind` in coordinates scaled to its half-extent (u right, v down, in -1..1)."""
  au, av = np.abs(u), np.abs(v)
  box, radius = np.maximum(au, av), np.sqrt(u * u + v * v)
  name = CLASS_NAMES[kind]
  if name == "circle":
    return radius <= 1
  if name == "square":
    return box <= 0.8
  if name == "triangle":  # apex up, base down
    return (v >= -0.9) & (v <= 0.8) & (au <= (v + 0.9) / 1.7 * 0.95)
  if name == "plus":
    return ((au <= 0.25) & (av <= 0.95)) | ((av <= 0.25) & (au <= 0.95))
  if name == "ring":
    return (radius <= 1) & (radius >= 0.55)
  if name == "frame":
    return (box <= 0.9) & (box >= 0.55)
  if name == "diamond":
    return au + av <= 1
  if name == "x":
    return ((np.abs(u - v) <= 0.35) | (np.abs(u + v) <= 0.35)) & (box <= 0.9)
  if name == "hbar":
    return (av <= 0.25) & (au <= 1)
  return (au <= 0.25) & (av <= 1)  # vbar


def draw(labels: np.ndarray, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
         chunk: int = 256) -> np.ndarray:
  """uint8 [N, S, S, 3]: one image of each label's shape, its randomness from `rng`.

  Drawn `chunk` images at a time: the float32 temporaries of the whole set would be ~50x the
  uint8 result, and fresh memory is slow to fault in on some VMs (seconds for 10k images).
  """
  out = np.empty((len(labels), image_size, image_size, 3), np.uint8)
  for start in range(0, len(labels), chunk):
    out[start:start + chunk] = _draw(labels[start:start + chunk], rng, image_size)
  return out


def _draw(labels: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
  n, s = len(labels), image_size
  half = rng.uniform(0.25, 0.45, n) * s                       # the shape's half-extent, pixels
  centre = rng.uniform(half[:, None], s - half[:, None], (n, 2))   # the whole shape is inside
  background = rng.uniform(0, 255, (n, 3))
  colour = rng.uniform(0, 255, (n, 3))
  # A shape must stand out: a colour too close to its background is moved to the far side.
  close = np.abs(colour - background).sum(axis=1) < 150
  colour[close] = 255 - background[close]
  noise = rng.standard_normal((n, s, s, 1), dtype=np.float32) * 8    # grey: 1/3 the draws
  ys, xs = (np.mgrid[0:s, 0:s] + 0.5).astype(np.float32)
  half32, centre32 = half.astype(np.float32)[:, None, None], centre.astype(np.float32)
  u = (xs[None] - centre32[:, 0, None, None]) / half32
  v = (ys[None] - centre32[:, 1, None, None]) / half32
  inside = np.zeros((n, s, s, 1), np.float32)
  for kind in range(NUM_CLASSES):
    rows = labels == kind
    inside[rows, ..., 0] = _mask(kind, u[rows], v[rows])
  background, colour = background.astype(np.float32), colour.astype(np.float32)
  pixels = background[:, None, None] + inside * (colour - background)[:, None, None]
  pixels += noise + 0.5  # + 0.5: the uint8 cast below then rounds
  return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def load(split: str, seed: int = 0, count: int | None = None,
         image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, S, S, 3], labels int32 [N]) of 'train' or 'eval'; classes balanced (N a
  multiple of 10 gives each class N/10), in a shuffled order. Cached: treat as read-only."""
  if split not in _SPLITS:
    raise ValueError(f"shapes split {split!r} is unknown; use 'train' or 'eval'")
  count = (NUM_TRAIN if split == "train" else NUM_EVAL) if count is None else count
  rng = np.random.default_rng([seed, _SPLITS[split]])
  labels = rng.permutation(np.arange(count) % NUM_CLASSES).astype(np.int32)
  images = draw(labels, rng, image_size)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels
