"""Contrastive image-text tasks on the two-tower family: 'siglip' (the sigmoid pairwise loss, Zhai
et al. 2023) and 'clip' (the softmax contrastive loss, Radford et al. 2021), both over the GLOBAL
batch; their input 'image_text' (foundation/data/image_text_input.py).

How the negatives reach each device. The step is one jit over the mesh: each device holds its rows
of the batch (images and texts sharded by 'batch' over data x fsdp) and computes its rows'
embeddings. `pair_logits` then asks for the text embeddings replicated (a logical constraint
with no mesh axis): XLA all-gathers them, B x E floats per device, and each device makes its
[B / n, B] block of the logits matrix -- its images against every text of the global batch. The
sigmoid loss is a sum over every entry, so each device sums its block and one all-reduce of a
scalar adds them. The softmax loss needs each row's log-sum-exp (local: the device holds whole
rows) and each column's (across devices: an all-reduce of two B-vectors, the max and the sum).
In the backward pass the gathered embeddings' gradients are reduce-scattered back to their rows.
Cost per step, n devices, batch B, embedding E: communication O(B x E) (the gather) + O(B) (the
column reductions); memory O(B / n x B) floats for the logits block (B = 32k on 256 devices:
16 MB per device) and O(B x E) for the gathered embeddings. No device ever holds the full B x B
matrix unless the batch is not split.

Pairs whose texts are identical (the same token ids) count as positives too: a drawn or templated
set repeats captions, and calling "two red circles on the left" a negative of another image with
that caption would teach noise. With distinct texts both losses are exactly the papers'.

  sigmoid: loss_sum = - sum_ij log sigmoid(z_ij * (exp(t) <x_i, y_j> + b)),  z_ij = +1 / -1
  softmax: loss_sum = sum_i (CE_image->text_i + CE_text->image_i) / 2,  scale exp(t)
Both are divided by the number of real rows (label_mask 1): the per-image loss of big_vision.
Padding rows are neither rows nor negatives.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from foundation import registry
from foundation.tasks import base

IMAGE = ("batch", "height", "width", "channels")
TOKENS = ("batch", "length")
ROWS = ("batch",)
NEG = -1e9  # a masked logit: exp() is 0, and no inf - inf


def pair_logits(image_emb, text_emb, scale, bias):
  """float32 [B, B]: image i against text j. Each device computes its image rows against every
  text (the texts all-gathered, see the module docstring)."""
  texts = nn.with_logical_constraint(text_emb, (None, None))   # replicated: the all-gather
  images = nn.with_logical_constraint(image_emb, ("batch", None))
  logits = jnp.einsum("ie,je->ij", images, texts, preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits * scale + bias, ("batch", None))


def positives(text, text_segments):
  """bool [B, B]: text i and text j are the same token ids (the diagonal, and repeats)."""
  ids = jnp.where(text_segments > 0, text, -1)
  ids = nn.with_logical_constraint(ids, (None, None))
  return nn.with_logical_constraint((ids[:, None, :] == ids[None, :, :]).all(-1), ("batch", None))


def sigmoid_loss_sum(logits, positive, valid):
  """- sum over valid pairs of log sigmoid(+-logit): SigLIP's loss before dividing by B."""
  sign = jnp.where(positive, 1.0, -1.0)
  pair = valid[:, None] & valid[None, :]
  return jnp.where(pair, -jax.nn.log_sigmoid(sign * logits), 0.0).sum()


def softmax_loss_sum(logits, positive, valid):
  """sum over valid rows of (CE image->text + CE text->image) / 2; the target of a row is any of
  its positives (-log of their total probability; one positive: the usual cross-entropy)."""
  pair = valid[:, None] & valid[None, :]
  masked = jnp.where(pair, logits, NEG)
  hits = jnp.where(pair & positive, logits, NEG)
  image_to_text = jax.nn.logsumexp(masked, axis=1) - jax.nn.logsumexp(hits, axis=1)
  text_to_image = jax.nn.logsumexp(masked, axis=0) - jax.nn.logsumexp(hits, axis=0)
  return jnp.where(valid, (image_to_text + text_to_image) / 2, 0.0).sum()


class _Contrastive(base.PerRow, base.Task):
  """What both losses share: the batch, checks, eval sums (loss and in-batch image->text top-1)."""
  input = "image_text"
  loss_kind = ""

  def check(self, config) -> None:
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    from foundation.models import vit  # pylint: disable=g-import-not-at-top
    image_text_input.check_config(config)
    vit.check(config.model.image, config.data.image_size)
    if config.data.text_len > config.model.text.max_len:
      raise ValueError(f"data.text_len={config.data.text_len} is longer than the text tower "
                       f"allows: model.text.max_len={config.model.text.max_len}")
    if config.grad_accum > 1:
      raise ValueError(f"grad_accum={config.grad_accum}: the {config.task} loss takes its "
                       f"negatives from the whole batch, and micro-batches would each see only "
                       f"theirs (a different loss); use grad_accum=1")

  def split_sizes(self, config) -> dict[str, str]:
    return {"length": "data.text_len"}

  def tokenizer(self, check_vocab: bool = True):
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    tokenizer = image_text_input.make_tokenizer(self.config)
    vocab = self.config.model.text.vocab_size
    if check_vocab and tokenizer.vocab_size > vocab:
      raise ValueError(f"data.tokenizer={self.config.data.tokenizer!r} has "
                       f"{tokenizer.vocab_size} ids but model.text.vocab_size={vocab}")
    return tokenizer

  def batch_spec(self) -> dict[str, base.Field]:
    d = self.config.data
    return {"image": base.Field((d.image_size, d.image_size, d.channels), "float32", IMAGE),
            "text": base.Field((d.text_len,), "int32", TOKENS),
            "text_segments": base.Field((d.text_len,), "int32", TOKENS, fill=1),
            "label_mask": base.Field((), "int32", ROWS, fill=1)}

  def model_args(self, batch: dict) -> tuple:
    return batch["image"], batch["text"], batch["text_segments"]

  def logits(self, model, params, batch):
    image_emb, text_emb, scale, bias = model.apply({"params": params}, *self.model_args(batch))
    return pair_logits(image_emb, text_emb, scale, bias)

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    logits = self.logits(model, params, batch)
    positive = positives(batch["text"], batch["text_segments"])
    valid = batch["label_mask"] > 0
    loss = (sigmoid_loss_sum if self.loss_kind == "sigmoid" else softmax_loss_sum)(
        logits, positive, valid)
    # In-batch image->text top-1: the best text of a real row is one of its positives.
    best = jnp.argmax(jnp.where(valid[None, :], logits, NEG), axis=1)
    hit = jnp.take_along_axis(positive, best[:, None], axis=1)[:, 0]
    return {"loss_sum": loss, "correct": jnp.where(valid, hit, False).sum().astype(jnp.float32)}

  def flops_per_example(self, model) -> float:
    from foundation.models import two_tower  # pylint: disable=g-import-not-at-top
    from foundation.models import vit  # pylint: disable=g-import-not-at-top
    d, cfg = self.config.data, model.cfg
    return (vit.flops_per_example(cfg.image, d.image_size, d.channels)
            + two_tower.text_flops_per_example(cfg.text, d.text_len)
            + 6 * cfg.embed_dim * (cfg.image.width * cfg.image_proj
                                   + cfg.text.width * cfg.text_proj))


@registry.register("task", "siglip")
class SigmoidContrastive(_Contrastive):
  """SigLIP's sigmoid pairwise loss over the global batch."""
  loss_kind = "sigmoid"


@registry.register("task", "clip")
class SoftmaxContrastive(_Contrastive):
  """CLIP's softmax contrastive loss (both directions) over the global batch."""
  loss_kind = "softmax"


@registry.register("input", "image_text")
def image_text_input_(config, index: int, count: int, with_eval: bool):
  from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
  return (image_text_input.make_train_iterator(config, index, count),
          image_text_input.eval_batches(config, index, count) if with_eval else [])


# ---------------------------------------------------------------- evaluators
# config.evaluate.tasks / python -m foundation.evaluate --tasks: 'zeroshot' and 'retrieval'.
# Each is built once from (config, runtime, argument) and yields (name, value) pairs.

class Embedder:
  """Unit embeddings of many images or texts with a two-tower run's params: rows in batches of
  config.batch_size laid out like training batches (the last one padded), every host holding all
  rows and placing its slice; float32 numpy [N, E] back on every host."""

  def __init__(self, config, runtime):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from foundation import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    from foundation.models import two_tower  # pylint: disable=g-import-not-at-top
    self.np, self.mesh_lib, self.config, self.runtime = np, mesh_lib, config, runtime
    if not isinstance(runtime.model, two_tower.TwoTower):
      raise ValueError(f"evaluate.tasks zeroshot/retrieval need a two-tower run "
                       f"(model.family='two_tower'), not model.family="
                       f"{config.model.get('family', 'decoder')!r}")
    self.sharding = step_lib.batch_shardings(config, runtime.mesh, step_lib.make_task(config))
    model = runtime.model
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    self._text = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, method="encode_text"))
    self.tokenizer = image_text_input.make_tokenizer(config)
    self.text_len = int(config.data.text_len)

  def _run(self, fn, params, arrays: dict) -> "np.ndarray":
    np, rows = self.np, len(next(iter(arrays.values())))
    size, count = self.config.batch_size, jax.process_count()
    host, first = size // count, jax.process_index() * (size // count)
    out = []
    with jax.set_mesh(self.runtime.mesh), nn.logical_axis_rules(self.runtime.axis_rules):
      for start in range(0, rows, size):
        part = {k: v[start:start + size] for k, v in arrays.items()}
        pad = size - len(next(iter(part.values())))
        part = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])[first:first + host]
                for k, v in part.items()}
        placed = self.mesh_lib.make_global_batch(part, {k: self.sharding[k] for k in part})
        from foundation import generate as generate_lib  # pylint: disable=g-import-not-at-top
        out.append(generate_lib.to_host(fn(params, *placed.values()))[:size - pad])
    return np.concatenate(out).astype(np.float32)

  def images(self, params, images) -> "np.ndarray":
    return self._run(self._image, params, {"image": images.astype(self.np.float32)})

  def texts(self, params, texts) -> "np.ndarray":
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    ids, segments = image_text_input.tokenize(texts, self.tokenizer, self.text_len)
    return self._run(self._text, params, {"text": ids, "text_segments": segments})


def _eval_images(config, raw):
  """float32 pixels of raw (uint8 or encoded) images through data.pp_eval."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from foundation.data import image_input  # pylint: disable=g-import-not-at-top
  pp = image_input.Preprocess(config, config.data.pp_eval, "data.pp_eval")
  zeros = np.zeros(len(raw), np.int64)
  return np.concatenate([pp(raw[s:s + 256], zeros[s:s + 256], np.arange(s, min(s + 256, len(raw))))
                         for s in range(0, len(raw), 256)])


def zero_shot_accuracy(image_emb, class_emb, labels) -> float:
  """Top-1 of classifying each image as its most similar class embedding."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return float(np.mean(np.argmax(image_emb @ class_emb.T, axis=1) == labels))


def class_embeddings(embedder, params, prompts: list[list[str]]):
  """[classes, E]: the normalised mean of each class's prompt embeddings (prompt ensembling)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat = [p for group in prompts for p in group]
  emb = embedder.texts(params, flat)
  out, k = [], 0
  for group in prompts:
    mean = emb[k:k + len(group)].mean(0)
    out.append(mean / max(np.linalg.norm(mean), 1e-12))
    k += len(group)
  return np.stack(out)


@registry.register("evaluator", "zeroshot")
class ZeroShot:
  """Zero-shot classification from class-name prompts. 'zeroshot' (scenes): the held-out
  colour-shape combinations (data.num_heldout scenes never seen in training) classified among all
  30 colour-shape names, each class the mean embedding of its captions (every count and
  position); also the shape alone (5 classes) and the colour alone (6). 'zeroshot:FILE.jsonl':
  records {"image": PATH, "label": NAME}: the classes are the labels seen, each prompted by its
  own name."""

  def __init__(self, config, runtime, argument: str = ""):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from foundation.data import scenes  # pylint: disable=g-import-not-at-top
    self.embedder = Embedder(config, runtime)
    if argument:
      self.name, images, self.labels, self.prompts = _labelled_file(config, argument)
      self.images, self.extra = images, {}
      return
    if not config.data.source.startswith("scenes"):
      raise ValueError(f"evaluate.tasks 'zeroshot' reads the held-out scenes (data.source="
                       f"'scenes'); for data.source={config.data.source!r} give "
                       f"'zeroshot:FILE.jsonl' ({{\"image\": PATH, \"label\": NAME}} lines)")
    held = scenes.load("heldout", 0, int(config.data.num_heldout), int(config.data.image_size))
    self.name, self.images = "zeroshot", _eval_images(config, np.asarray(held.images))
    self.labels, self.prompts = held.combo(), scenes.combo_prompts()
    colours = len(scenes.COLOUR_NAMES)
    # shape alone: every colour's prompts of that shape; colour alone: every shape's
    self.extra = {
        "shape": (np.asarray(held.shape), [sum(self.prompts[s * colours:(s + 1) * colours], [])
                                           for s in range(len(scenes.SHAPES))]),
        "colour": (np.asarray(held.colour), [sum(self.prompts[c::colours], [])
                                             for c in range(colours)])}

  def run(self, params):
    image_emb = self.embedder.images(params, self.images)
    classes = class_embeddings(self.embedder, params, self.prompts)
    yield f"{self.name}/accuracy", zero_shot_accuracy(image_emb, classes, self.labels)
    yield f"{self.name}/chance", 1.0 / len(self.prompts)
    for what, (labels, prompts) in self.extra.items():
      yield (f"{self.name}/{what}_accuracy",
             zero_shot_accuracy(image_emb, class_embeddings(self.embedder, params, prompts), labels))
    yield f"{self.name}/examples", float(len(self.labels))


def _labelled_file(config, path: str):
  """(name, pixels, labels, prompts) of a JSONL of {"image": PATH, "label": NAME} lines."""
  import os  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from foundation.data import examples  # pylint: disable=g-import-not-at-top
  from foundation.data import image_input  # pylint: disable=g-import-not-at-top
  from foundation.data import sources  # pylint: disable=g-import-not-at-top
  records = examples.read_jsonl([path])
  folder, paths, names = os.path.dirname(os.path.abspath(path)), [], []
  for record in records:
    value = record.value if isinstance(record.value, dict) else {}
    if "image" not in value or "label" not in value:
      raise ValueError(f"{record.where}: a zero-shot record needs 'image' and 'label'")
    image = os.path.join(folder, str(value["image"]))
    if not os.path.isfile(image):
      raise ValueError(f"{record.where}: image {value['image']!r} does not exist (looked for "
                       f"{image})")
    paths.append(image)
    names.append(str(value["label"]))
  raw = np.empty(len(paths), dtype=object)
  raw[:] = [sources.read_file(p) for p in paths]
  image_input.check_decodes(raw, paths)
  classes = sorted(set(names))
  labels = np.array([classes.index(n) for n in names], np.int32)
  name = "zeroshot/" + os.path.splitext(os.path.basename(path))[0]
  return name, _eval_images(config, raw), labels, [[c] for c in classes]


@registry.register("evaluator", "retrieval")
class Retrieval:
  """Image->text and text->image retrieval over the eval split's pairs (the first eval.steps *
  batch_size): recall@1 and @5. A retrieved item is right when its text is the query's text
  (a drawn set repeats captions: any image with the same caption is a right answer)."""

  def __init__(self, config, runtime, argument: str = ""):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
    del argument
    self.embedder = Embedder(config, runtime)
    data = image_text_input.read_split(config, "eval")
    count = min(len(data.texts), config.eval.steps * config.batch_size)
    self.texts = list(data.texts[:count])
    self.images = _eval_images(config, data.raw[:count])
    _, inverse = np.unique(np.array(self.texts), return_inverse=True)
    self.text_id = inverse.reshape(-1)

  def run(self, params):
    import numpy as np  # pylint: disable=g-import-not-at-top
    image_emb = self.embedder.images(params, self.images)
    text_emb = self.embedder.texts(params, self.texts)
    sims = image_emb @ text_emb.T
    same = self.text_id[:, None] == self.text_id[None, :]
    for direction, scores in (("image_to_text", sims), ("text_to_image", sims.T)):
      order = np.argsort(-scores, axis=1, kind="stable")
      hits = np.take_along_axis(same, order, axis=1)
      for k in (1, 5):
        yield f"retrieval/{direction}_recall@{k}", float(hits[:, :k].any(axis=1).mean())
    yield "retrieval/examples", float(len(self.texts))
