"""The image-conditioned LM's task ('vlm'), its input ('vlm') and its exact-match evaluator
('vlm_exact').

A row is one image and one text: a prompt made from a template that begins with the image
placeholder ("<image> question: {question} answer:", "<image> caption:"), then the target (the
answer, the caption) and EOS. The model sees [image tokens] + [BOS] prompt target; the loss is the
next-token cross-entropy on the target's tokens and EOS only (loss_mask), as sums (tasks/text.py).

Batch: image float32 [b, H, W, C]; inputs, targets, segment_ids, loss_mask int32 [b, T]
(T = data.text_len, right-padded; segment 0 on padding). Text positions are 0..T-1 (the model puts
them after the image's).

The input: the drawn scenes (foundation/data/scenes.py; data.source='scenes'), or a JSONL file of
image paths with texts (data.source='files:PAIRS.jsonl': {"image": PATH, "caption": TEXT} and/or
{"question": ..., "answer": ...} per line, paths relative to the file; data.eval_fraction of the
lines are the eval split). data.text picks the rows: 'caption', 'qa' (the four questions of each
scene, a record's question) or 'both' (a scene's caption and its four questions). The 'heldout'
split (colour-shape combinations never trained on) is what `vlm_exact` scores: greedy answers and
captions compared whole with the truth.
"""

import numpy as np
import jax.numpy as jnp

from foundation import registry
from foundation.models import vit
from foundation.models import vlm as vlm_model
from foundation.tasks import base
from foundation.tasks import text as text_task

TOKENS = ("batch", "length")
TEXTS = ("caption", "qa", "both")
PROMPT_FIELDS = ("data.caption_prompt", "data.qa_prompt")
QUESTIONS_PER_SCENE = 4


def data_config():
  """The `config.data` fields of the vlm input (configs/vlm.py places them)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from foundation.data import scenes  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      source="scenes",        # 'scenes' or 'files:PAIRS.jsonl' (image paths with texts)
      text="both",            # 'caption', 'qa' or 'both'
      caption_prompt=vlm_model.IMAGE_PLACEHOLDER + " caption:",
      qa_prompt=vlm_model.IMAGE_PLACEHOLDER + " question: {question} answer:",
      text_len=64,            # tokens per row: BOS, prompt, target, EOS (cut, right-padded)
      tokenizer="byte",
      image_size=32,
      channels=3,
      pp_train="decode|value_range(-1,1)",   # no flip: captions say left and right
      pp_eval="decode|value_range(-1,1)",
      num_train=scenes.NUM["train"],
      num_eval=scenes.NUM["eval"],
      num_heldout=scenes.NUM["heldout"],
      eval_fraction=0.1,      # JSONL: the share of lines held out for eval (by line hash)
      prefetch=2,
  ))


def check_prompts(config) -> None:
  """Each prompt template begins with the image placeholder (the prefix's place); the question's
  holds {question}. ValueError naming the field."""
  place = vlm_model.IMAGE_PLACEHOLDER
  for field in PROMPT_FIELDS:
    template = str(config.data[field.split(".")[1]])
    if not template.lstrip().startswith(place):
      raise ValueError(f"{field}={template!r} has no image placeholder {place!r} at its start: "
                       f"the image tokens come first (e.g. {place + ' question: {question} answer:'!r})")
    if template.count(place) != 1:
      raise ValueError(f"{field}={template!r} holds {place!r} {template.count(place)} times; "
                       f"one image per row: once, at the start")
  if "{question}" not in config.data.qa_prompt:
    raise ValueError(f"data.qa_prompt={config.data.qa_prompt!r} has no {{question}} field")


def prompt_text(template: str, **fields) -> str:
  """The template's text after the image placeholder, filled ("question: ... answer:")."""
  rest = template.lstrip()[len(vlm_model.IMAGE_PLACEHOLDER):].strip()
  return rest.format(**fields)


def encode_row(tokenizer, prompt: str, target: str, length: int):
  """(inputs, targets, loss_mask, segments): int32 [length] each, from [BOS] prompt ' ' target
  [EOS]; the loss on the target and EOS. Cut to length + 1 tokens, right-padded."""
  head = [tokenizer.bos_id] + tokenizer.encode(prompt)
  tail = tokenizer.encode(" " + target) + [tokenizer.eos_id]
  ids = (head + tail)[:length + 1]
  weights = ([0] * len(head) + [1] * len(tail))[:length + 1]
  n = len(ids) - 1
  out = np.full((4, length), 0, np.int32)
  out[0, :] = out[1, :] = tokenizer.pad_id
  out[0, :n], out[1, :n], out[2, :n], out[3, :n] = ids[:-1], ids[1:], weights[1:], 1
  return out


def scene_rows(scenes_split, text: str, template_caption: str, template_qa: str):
  """[(scene index, prompt, target)] of a split: per scene its caption, its questions, or both."""
  rows = []
  for i in range(len(scenes_split)):
    if text in ("caption", "both"):
      rows.append((i, prompt_text(template_caption), scenes_split.caption(i)))
    if text in ("qa", "both"):
      for question, answer in scenes_split.questions(i):
        rows.append((i, prompt_text(template_qa, question=question), answer))
  return rows


# ---------------------------------------------------------------- the task

@registry.register("task", "vlm")
class ImageConditionedLM(base.Task):
  """Next-token cross-entropy on the text after an image prefix, the target tokens only."""
  input = "vlm"
  unit = "tokens"

  def check(self, config) -> None:
    if config.model.get("family") != "vlm":
      raise ValueError(f"task='vlm' needs model.family='vlm', not {config.model.get('family')!r}")
    source = str(config.data.source)
    if source != "scenes" and not (source.startswith("files:") and len(source) > 6):
      raise ValueError(f"data.source={source!r}: the vlm input reads the drawn scenes ('scenes') "
                       f"or a JSONL file of image paths with texts ('files:PAIRS.jsonl'); for a "
                       f"TFDS dataset, write its pairs to such a file")
    if config.data.text not in TEXTS:
      raise ValueError(f"data.text={config.data.text!r} is not one of {TEXTS}")
    if config.data.text_len < 4:
      raise ValueError(f"data.text_len={config.data.text_len} must be at least 4")
    check_prompts(config)
    cfg = vlm_model.VLMConfig.from_config(config.model, int(config.data.image_size))
    if config.data.text_len > cfg.max_seq_len:
      raise ValueError(f"data.text_len={config.data.text_len} + {cfg.num_image_tokens} image "
                       f"tokens exceed model.decoder.max_seq_len={cfg.decoder.max_seq_len}")
    if config.model.image.dropout:
      raise ValueError(f"model.image.dropout={config.model.image.dropout}: the vlm's image "
                       f"tower runs without dropout; set it to 0")

  def tokenizer(self, check_vocab: bool = True):
    from foundation import data  # pylint: disable=g-import-not-at-top
    tokenizer = data.make_tokenizer(self.config.data.tokenizer)
    vocab = self.config.model.decoder.vocab_size
    if check_vocab and tokenizer.vocab_size > vocab:
      raise ValueError(f"the tokenizer data.tokenizer={self.config.data.tokenizer!r} has "
                       f"vocab_size {tokenizer.vocab_size}, more than model.decoder.vocab_size="
                       f"{vocab}")
    return tokenizer

  def batch_spec(self) -> dict[str, base.Field]:
    d = self.config.data
    row = (int(d.text_len),)
    return {"image": base.Field((int(d.image_size), int(d.image_size), int(d.channels)),
                                "float32", vit.IMAGE),
            "inputs": base.Field(row, "int32", TOKENS),
            "targets": base.Field(row, "int32", TOKENS),
            "segment_ids": base.Field(row, "int32", TOKENS, fill=1),
            "loss_mask": base.Field(row, "int32", TOKENS, fill=1)}

  def model_args(self, batch: dict) -> tuple:
    tokens = batch["inputs"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return tokens, positions, batch["segment_ids"], None, batch["image"]

  def loss_sums(self, model, params, batch, rngs=None) -> dict:
    logits = model.apply({"params": params}, *self.model_args(batch))
    ce, z = text_task.cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    correct = ((jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"]).sum()
    return {"loss_sum": ce, "z_sum": z, "correct": correct.astype(jnp.float32)}

  def objective(self, sums: dict):
    return sums["loss_sum"] + self.config.optim.z_loss * sums["z_sum"]

  def count(self, batch: dict):
    return jnp.maximum(batch["loss_mask"].sum().astype(jnp.float32), 1.0)

  def count_unclamped(self, batch: dict):
    return batch["loss_mask"].sum().astype(jnp.float32)

  def eval_sums(self, model, params, batch) -> dict:
    sums = self.loss_sums(model, params, batch)
    return {"loss_sum": sums["loss_sum"], "correct": sums["correct"],
            "count": self.count_unclamped(batch)}

  def eval_metrics(self, sums: dict) -> dict:
    count = max(sums.get("count", 0.0), 1.0)
    return {"loss": sums.get("loss_sum", 0.0) / count,
            "token_accuracy": sums.get("correct", 0.0) / count}

  def flops_per_example(self, model) -> float:
    return vlm_model.flops_per_example(model.cfg, int(self.config.data.image_size),
                                       int(self.config.data.text_len))

  def units_per_example(self) -> int:
    return int(self.config.data.text_len)


# ---------------------------------------------------------------- the input

def jsonl_rows(records: list[dict], text: str, template_caption: str, template_qa: str):
  """[(record index, prompt, target)] of a JSONL file's records: a record's 'caption' (text
  'caption' or 'both') and its 'question' with 'answer' (text 'qa' or 'both'). A record giving
  the rows asked for none of is a ValueError naming its line."""
  rows = []
  for i, record in enumerate(records):
    before = len(rows)
    if text in ("caption", "both") and "caption" in record:
      rows.append((i, prompt_text(template_caption), str(record["caption"])))
    if text in ("qa", "both") and "question" in record and "answer" in record:
      rows.append((i, prompt_text(template_qa, question=str(record["question"])),
                   str(record["answer"])))
    if len(rows) == before:
      wanted = {"caption": "'caption'", "qa": "'question' and 'answer'",
                "both": "'caption', or 'question' and 'answer'"}[text]
      raise ValueError(f"{record['where']}: data.text={text!r} needs {wanted} (the record has "
                       f"{sorted(k for k in record if k != 'where')})")
  return rows


def _split_rows(config, split: str, tokenizer):
  """(images, rows [(image index, prompt, target)], encoded int32 [N, 4, T], name) of a split:
  the drawn scenes' pixels, or a JSONL file's encoded images."""
  from foundation.data import image_text_input  # pylint: disable=g-import-not-at-top
  from foundation.data import scenes  # pylint: disable=g-import-not-at-top
  d = config.data
  if d.source == "scenes":
    drawn = scenes.load(split, 0, int(d[f"num_{split}"]), int(d.image_size))
    images, rows = drawn.images, scene_rows(drawn, d.text, d.caption_prompt, d.qa_prompt)
    name = f"scenes {d.image_size}px {split} {d[f'num_{split}']}"
  else:
    images, records, name = image_text_input.read_jsonl_images(config, split)
    rows = jsonl_rows(records, d.text, d.caption_prompt, d.qa_prompt)
  encoded = np.stack([encode_row(tokenizer, p, t, int(d.text_len)) for _, p, t in rows])
  return images, rows, encoded, name


def _builder(images, rows, encoded, pp):
  image_of = np.array([r[0] for r in rows], np.int64)

  def build(picked) -> dict[str, np.ndarray]:
    real = np.array([bool(r) for r in picked])
    index = np.array([r[0] if r else 0 for r in picked], np.int64)
    epoch = np.array([r[1] if r else 0 for r in picked], np.int64)
    enc = encoded[index]
    image = image_of[index]
    keep = real[:, None].astype(np.int32)
    return {"image": pp(images[image], epoch, image),
            "inputs": enc[:, 0], "targets": enc[:, 1],
            "loss_mask": enc[:, 2] * keep, "segment_ids": enc[:, 3] * keep}
  return build


@registry.register("input", "vlm")
def vlm_input(config, index: int, count: int, with_eval: bool):
  from foundation.data import examples  # pylint: disable=g-import-not-at-top
  from foundation.data import image_input  # pylint: disable=g-import-not-at-top
  from foundation.data import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  images, rows, encoded, name = _split_rows(config, "train", tokenizer)
  pp = image_input.Preprocess(config, config.data.pp_train, "data.pp_train")
  pp.check(images[0])
  n = len(rows)

  def plan(epoch: int):
    return [(int(i), epoch) for i in examples.shuffled(n, config.seed, 0, epoch)]
  d = config.data
  identity = {"data": f"{name} {d.text}",
              "prompts": [d.caption_prompt, d.qa_prompt], "seed": int(config.seed),
              "pp_train": d.pp_train, "text_len": int(d.text_len), "tokenizer": str(d.tokenizer)}
  description = {"sources": [[d.source, 1.0]], "position_kind": "vlm", "process_count": count,
                 "num_examples": n}
  train = examples.EpochIterator(plan, _builder(images, rows, encoded, pp), config.batch_size,
                                 index, count, identity, description)
  evals = []
  if with_eval:
    e_images, e_rows, e_encoded, _ = _split_rows(config, "eval", tokenizer)
    e_pp = image_input.Preprocess(config, d.pp_eval, "data.pp_eval")
    evals = examples.eval_batches([(i, 0) for i in range(len(e_rows))],
                                  _builder(e_images, e_rows, e_encoded, e_pp), config, index, count)
  return train, evals


# ---------------------------------------------------------------- exact match

def exact_match(model, params, tokenizer, config, split: str = "heldout", limit: int = 0,
                batch_size: int = 64, mesh=None, axis_rules=None) -> dict[str, float]:
  """Greedy answers and captions of a scenes split compared whole with the truth.

  {'qa': share of questions answered exactly, 'caption': share of captions written exactly,
   'qa/<kind>' for count, colour, shape, position; 'caption/<kind>': share of captions naming
   that attribute right (scenes.caption_attributes), 'caption/attributes' their mean;
   'examples': scenes}. `limit` scenes (0: all of
  data.num_<split>). A text_only model gets the same prompts without the image.
  """
  from foundation import generate  # pylint: disable=g-import-not-at-top
  from foundation.data import image_input  # pylint: disable=g-import-not-at-top
  from foundation.data import scenes  # pylint: disable=g-import-not-at-top
  d = config.data
  count = int(d[f"num_{split}"]) if not limit else min(limit, int(d[f"num_{split}"]))
  drawn = scenes.load(split, 0, int(d[f"num_{split}"]), int(d.image_size))
  pp = image_input.Preprocess(config, d.pp_eval, "data.pp_eval")
  kinds = ("count", "colour", "shape", "position")
  jobs = []  # (scene, kind, prompt ids, truth)
  for i in range(count):
    jobs.append((i, "caption", prompt_text(d.caption_prompt), drawn.caption(i)))
    for kind, (question, answer) in zip(kinds, drawn.questions(i)):
      jobs.append((i, kind, prompt_text(d.qa_prompt, question=question), answer))
  max_new = max(len(tokenizer.encode(" " + t)) for *_, t in jobs) + 1
  hits = {k: [] for k in ("caption", *kinds)}
  parts = {k: [] for k in kinds}
  text_room = model.cfg.max_seq_len
  for start in range(0, len(jobs), batch_size):
    chunk = jobs[start:start + batch_size]
    scene_ids = np.array([j[0] for j in chunk], np.int64)
    images = pp(drawn.images[scene_ids], np.zeros(len(chunk)), scene_ids)
    prompts = [[tokenizer.bos_id] + tokenizer.encode(j[2]) for j in chunk]
    out = generate.generate(model, params, prompts, max_new_tokens=max_new, max_len=text_room,
                            stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
                            mesh=mesh, axis_rules=axis_rules, images=images)
    for job, ids in zip(chunk, out):
      said = tokenizer.decode(ids).strip()
      hits[job[1]].append(said == job[3])
      if job[1] == "caption":  # each attribute the caption names, against the truth's
        truth, told = scenes.caption_attributes(job[3]), scenes.caption_attributes(said)
        for kind in kinds:
          parts[kind].append(told[kind] == truth[kind])
  result = {f"qa/{k}": float(np.mean(hits[k])) for k in kinds}
  result["qa"] = float(np.mean(sum((hits[k] for k in kinds), [])))
  result["caption"] = float(np.mean(hits["caption"]))
  result.update({f"caption/{k}": float(np.mean(parts[k])) for k in kinds})
  result["caption/attributes"] = float(np.mean(sum((parts[k] for k in kinds), [])))
  result["examples"] = float(count)
  return result


@registry.register("evaluator", "vlm_exact")
class ExactMatch:
  """evaluate.tasks 'vlm_exact' (held-out scenes) or 'vlm_exact:eval': exact match of greedy
  answers and captions; limit: evaluate.limit scenes."""

  def __init__(self, config, runtime, argument: str = ""):
    self.config, self.runtime = config, runtime
    if config.data.source != "scenes":
      raise ValueError(f"evaluate.tasks 'vlm_exact' scores the drawn scenes' questions and "
                       f"captions; data.source={config.data.source!r} has its eval split's loss "
                       f"and token accuracy (eval.every) instead")
    self.split = argument or "heldout"
    if self.split not in ("heldout", "eval"):
      raise ValueError(f"evaluate.tasks 'vlm_exact:{argument}': the split is 'heldout' or 'eval'")
    self.limit = int(config.get("evaluate", {}).get("limit", 0))

  def run(self, params):
    r = self.runtime
    result = exact_match(r.model, params, r.tokenizer, self.config, self.split, self.limit,
                         mesh=r.mesh, axis_rules=r.axis_rules)
    for name, value in result.items():
      yield f"vlm_exact_{self.split}/{name}", value
