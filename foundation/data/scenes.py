"""The embedded image-text set: scenes drawn in numpy with the captions and question/answer pairs
that describe them, so image-text runs work offline.

A scene is `count` (1-3) copies of one shape (SHAPES) in one colour (COLOURS), all in one half of
the image (POSITIONS: left or right), on a dark noisy background; uint8 [size, size, 3]. Its
caption names all four attributes ("two red circles on the left"); its questions ask for each
("how many shapes are there?" -> "two", "what colour are the shapes?" -> "red", "what shape are
they?" -> "circle", "where are the shapes?" -> "left").

Held-out combinations (HELD_OUT: one colour per shape, e.g. cyan circles) never appear in the
'train' or 'eval' splits; the 'heldout' split holds only them. A model that names a cyan circle
right has put together 'cyan' and 'circle', seen apart, not recalled a pair (generalisation, not
memory): the zero-shot evaluator classifies 'heldout' images among all 30 colour-shape names.

Everything is a pure function of (seed, split, count, image_size): numpy's PCG64 streams are
fixed across versions and machines, and the splits use different streams.
"""

import dataclasses
import functools

import numpy as np

from foundation.data import shapes

SHAPES = ("circle", "square", "triangle", "plus", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (60, 90, 240),
           "yellow": (230, 210, 40), "magenta": (210, 60, 200), "cyan": (40, 200, 210)}
COLOUR_NAMES = tuple(COLOURS)
POSITIONS = ("left", "right")
COUNT_WORDS = ("one", "two", "three")
# (shape, colour) index pairs that never appear in train/eval: shape i with colour 5 - i.
HELD_OUT = frozenset((s, len(COLOUR_NAMES) - 1 - s) for s in range(len(SHAPES)))
SPLITS = {"train": 0, "eval": 1, "heldout": 2}
NUM = {"train": 20_000, "eval": 1_000, "heldout": 1_000}
IMAGE_SIZE = 32
# An object's radius, a share of the side: 4.5-5.1 px at 32 px, so three fit one above another
# in a half and an 8-px patch sees a shape's outline (at 3.2-4 px a tiny ViT told the 5 shapes
# apart 54% of the time after 600 steps, at this size 89%).
RADIUS = (0.14, 0.16)


@dataclasses.dataclass(frozen=True)
class Scenes:
  """A drawn split: pixels and the attributes each caption and answer come from."""
  images: np.ndarray     # uint8 [N, S, S, 3]
  shape: np.ndarray      # int32 [N], index into SHAPES
  colour: np.ndarray     # int32 [N], index into COLOUR_NAMES
  count: np.ndarray      # int32 [N], 1..3
  position: np.ndarray   # int32 [N], index into POSITIONS

  def __len__(self) -> int:
    return len(self.shape)

  def caption(self, i: int) -> str:
    return caption(int(self.shape[i]), int(self.colour[i]), int(self.count[i]),
                   int(self.position[i]))

  def captions(self) -> list[str]:
    return [self.caption(i) for i in range(len(self))]

  def questions(self, i: int) -> list[tuple[str, str]]:
    return questions(int(self.shape[i]), int(self.colour[i]), int(self.count[i]),
                     int(self.position[i]))

  def combo(self) -> np.ndarray:
    """int32 [N]: the colour-shape class (combo_names() order)."""
    return combo_label(self.shape, self.colour)


def caption(shape: int, colour: int, count: int, position: int) -> str:
  name = SHAPES[shape]
  if count > 1:
    name += "es" if name.endswith("s") else "s"  # pluses
  return f"{COUNT_WORDS[count - 1]} {COLOUR_NAMES[colour]} {name} on the {POSITIONS[position]}"


def caption_attributes(text: str) -> dict[str, str]:
  """The words a caption gives each attribute: {'count', 'colour', 'shape', 'position'} (a shape
  singular), '' where the text does not say. caption_attributes(caption(...)) names them all; a
  model's caption is scored attribute by attribute against the truth's."""
  words = text.split()
  found = {"count": "", "colour": "", "shape": "", "position": ""}
  for word in words:
    singular = word[:-2] if word.endswith("es") and word[:-2] in SHAPES else (
        word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word)
    for kind, names in (("count", COUNT_WORDS), ("colour", COLOUR_NAMES), ("shape", SHAPES),
                        ("position", POSITIONS)):
      if singular in names and not found[kind]:
        found[kind] = singular
  return found


def questions(shape: int, colour: int, count: int, position: int) -> list[tuple[str, str]]:
  """(question, answer) pairs about one scene; the answers are single words."""
  many = count > 1
  return [("how many shapes are there?", COUNT_WORDS[count - 1]),
          (f"what colour {'are the shapes' if many else 'is the shape'}?", COLOUR_NAMES[colour]),
          (f"what shape {'are they' if many else 'is it'}?", SHAPES[shape]),
          (f"where {'are the shapes' if many else 'is the shape'}?", POSITIONS[position])]


def combo_label(shape, colour):
  return (np.asarray(shape) * len(COLOUR_NAMES) + np.asarray(colour)).astype(np.int32)


def combo_names() -> list[str]:
  """'red circle', ... in combo_label order (shape-major)."""
  return [f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES]


def combo_prompts() -> list[list[str]]:
  """Per colour-shape class, the captions of every count and position: a zero-shot classifier
  averages their text embeddings (prompt ensembling, as CLIP's)."""
  return [[caption(s, c, n, p) for n in (1, 2, 3) for p in range(len(POSITIONS))]
          for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))]


def _attributes(split: str, rng: np.random.Generator, n: int):
  seen = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOUR_NAMES))
          if (s, c) not in HELD_OUT]
  pool = np.array(sorted(HELD_OUT) if split == "heldout" else seen, np.int32)
  pick = pool[rng.integers(0, len(pool), n)]
  return (pick[:, 0], pick[:, 1], rng.integers(1, 4, n).astype(np.int32),
          rng.integers(0, len(POSITIONS), n).astype(np.int32))


def draw(shape, colour, count, position, rng: np.random.Generator,
         image_size: int = IMAGE_SIZE, chunk: int = 256) -> np.ndarray:
  """uint8 [N, S, S, 3] scenes of the given attributes, their randomness from `rng`."""
  out = np.empty((len(shape), image_size, image_size, 3), np.uint8)
  for start in range(0, len(shape), chunk):
    part = slice(start, start + chunk)
    out[part] = _draw(shape[part], colour[part], count[part], position[part], rng, image_size)
  return out


def _draw(shape, colour, count, position, rng, s: int) -> np.ndarray:
  n = len(shape)
  background = rng.uniform(0, 60, (n, 3)).astype(np.float32)
  paint = np.asarray([COLOURS[COLOUR_NAMES[c]] for c in colour], np.float32)
  paint = np.clip(paint + rng.uniform(-25, 25, (n, 3)), 0, 255).astype(np.float32)
  ys, xs = (np.mgrid[0:s, 0:s] + 0.5).astype(np.float32)
  inside = np.zeros((n, s, s), bool)
  half_width = s / 2
  for slot in range(3):  # objects stacked in `count` horizontal bands of their half
    radius = rng.uniform(*RADIUS, n).astype(np.float32) * s
    band = s / count
    cy = (slot + 0.5) * band + rng.uniform(-1, 1, n) * np.maximum(band / 2 - radius - 0.5, 0)
    cx = (position * half_width + rng.uniform(radius + 0.5, half_width - radius - 0.5))
    u = (xs[None] - cx.astype(np.float32)[:, None, None]) / radius[:, None, None]
    v = (ys[None] - cy.astype(np.float32)[:, None, None]) / radius[:, None, None]
    active = slot < count
    for k, name in enumerate(SHAPES):
      rows = active & (shape == k)
      if rows.any():
        inside[rows] |= shapes._mask(shapes.CLASS_NAMES.index(name), u[rows], v[rows])  # pylint: disable=protected-access
  pixels = background[:, None, None] + inside[..., None] * (paint - background)[:, None, None]
  pixels += rng.standard_normal((n, s, s, 1), dtype=np.float32) * 6 + 0.5
  return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def load(split: str, seed: int = 0, count: int | None = None,
         image_size: int = IMAGE_SIZE) -> Scenes:
  """The drawn 'train', 'eval' or 'heldout' split (cached: treat as read-only)."""
  if split not in SPLITS:
    raise ValueError(f"scenes split {split!r} is unknown; use one of {', '.join(SPLITS)}")
  count = NUM[split] if count is None else int(count)
  if image_size < 16:
    raise ValueError(f"data.image_size={image_size}: scenes need at least 16 pixels")
  rng = np.random.default_rng([seed, 1000 + SPLITS[split]])
  attributes = _attributes(split, rng, count)
  images = draw(*attributes, rng, image_size)
  for a in (images, *attributes):
    a.flags.writeable = False
  return Scenes(images, *attributes)


def records(split: str, seed: int = 0, count: int | None = None,
            image_size: int = IMAGE_SIZE) -> list[dict]:
  """[{'image': uint8 [S, S, 3], 'caption': str, 'qa': [(question, answer), ...]}]: the form a
  captioning or visual-question model reads (one record per scene)."""
  scenes = load(split, seed, count, image_size)
  return [{"image": scenes.images[i], "caption": scenes.caption(i), "qa": scenes.questions(i)}
          for i in range(len(scenes))]
