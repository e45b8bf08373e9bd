"""Image-text input: batches {'image': float32 [b, H, W, C], 'text': int32 [b, T] token ids,
'text_segments': int32 [b, T] (1 on real tokens, 0 on padding), 'label_mask': int32 [b] (0 on
eval padding rows)} (b = batch_size / process_count) from `data.source`:

  'scenes'          the drawn scenes of scenes.py (offline): data.num_train / data.num_eval
                    scenes, captions that name shape, colour, count and position
  'files:F.jsonl'   a JSONL file, one image per line: {"image": "cats/1.jpg", "caption": "..."}
                    or {"image": ..., "question": ..., "answer": ...}; image paths relative to the
                    file's folder; data.eval_fraction of the lines held out (by line hash)
  'tfds:NAME'       a prepared TFDS dataset (coco_captions, ...) under data.tfds_data_dir:
                    features data.image_feature and data.caption_feature ('captions/text': a
                    nested feature by '/'; a list of captions gives its first)

The text of a pair (data.text): 'caption', or 'qa' ("question answer", the scene's questions in
turn; a JSONL record's question and answer). Texts are [BOS] + tokens + [EOS] of data.tokenizer,
cut to data.text_len and right-padded with its pad id.

Scenes and JSONL sets are in memory and resume exactly on any host count (examples.EpochIterator:
a global (epoch, row) position); TFDS streams through tf.data, each host its shard, its position
tf.data's own checkpoint (resuming on another host count is refused). Eval: the first
eval.steps * batch_size pairs of the eval split, the last batch padded with label_mask 0 rows.
"""

import dataclasses
import hashlib
import os

import ml_collections
import numpy as np

from foundation.data import examples
from foundation.data import image_input
from foundation.data import iterators
from foundation.data import scenes as scenes_lib
from foundation.data import sources

TEXTS = ("caption", "qa")


def image_text_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields of image-text pairs (configs/siglip.py places them)."""
  return ml_collections.ConfigDict(dict(
      source="scenes",         # 'scenes', 'files:CAPTIONS.jsonl' or 'tfds:NAME'
      text="caption",          # 'caption' or 'qa' (question and answer)
      text_len=48,             # tokens per text, BOS and EOS included
      tokenizer="byte",        # 'byte', a SentencePiece .model or an HF tokenizer.json
      image_size=32,
      channels=3,
      # image_ops chains; no flip: captions say left and right.
      pp_train="decode|value_range(-1,1)",
      pp_eval="decode|value_range(-1,1)",
      image_feature="image",   # TFDS feature names
      caption_feature="captions/text",
      train_split="train",     # TFDS splits
      eval_split="val",
      tfds_data_dir="",
      eval_fraction=0.1,       # JSONL: the share of lines held out for eval
      num_train=scenes_lib.NUM["train"],   # scenes drawn per split
      num_eval=scenes_lib.NUM["eval"],
      num_heldout=scenes_lib.NUM["heldout"],
      shuffle_buffer=10_000,   # TFDS
      prefetch=2,
  ))


@dataclasses.dataclass(frozen=True)
class PairSet:
  """An in-memory split: `raw` uint8 [N, H, W, C] pixels or object [N] encoded bytes, and texts."""
  raw: np.ndarray
  texts: list[str]
  identity: str


# ---------------------------------------------------------------- sources

def kind(config) -> tuple[str, str]:
  spec = config.data.source
  name, _, arg = spec.partition(":")
  if name not in ("scenes", "files", "tfds") or (name != "scenes" and not arg):
    raise ValueError(f"data.source={spec!r} is not an image-text source; use 'scenes', "
                     f"'files:CAPTIONS.jsonl' or 'tfds:NAME'")
  return name, arg


def check_config(config) -> None:
  """Field checks that need no data (the task calls them before any compile)."""
  kind(config)
  d = config.data
  if d.text not in TEXTS:
    raise ValueError(f"data.text={d.text!r} is not one of {TEXTS}")
  if d.text_len < 3:
    raise ValueError(f"data.text_len={d.text_len} must be at least 3 (BOS, a token, EOS)")
  if d.image_size <= 0 or d.channels <= 0:
    raise ValueError(f"data.image_size={d.image_size} and data.channels={d.channels} must be "
                     f"positive")


def _scenes(config, split: str) -> PairSet:
  count = int(config.data[f"num_{split}"])
  drawn = scenes_lib.load(split, 0, count, int(config.data.image_size))
  if config.data.text == "qa":
    texts = [" ".join(drawn.questions(i)[i % 4]) for i in range(len(drawn))]
  else:
    texts = drawn.captions()
  return PairSet(drawn.images, texts, f"scenes {config.data.image_size}px {split} {count} "
                                      f"{config.data.text}")


def _record_text(record: dict, where: str, text: str) -> str:
  if text == "caption" and "caption" in record:
    return str(record["caption"])
  if "question" in record and "answer" in record:
    return f"{record['question']} {record['answer']}"
  if "caption" in record:
    return str(record["caption"])
  raise ValueError(f"{where}: the record has neither 'caption' nor 'question' and 'answer' (it "
                   f"has {sorted(record)})")


def read_jsonl_images(config, split: str) -> tuple[np.ndarray, list[dict], str]:
  """(raw, records, identity) of a 'files:F.jsonl' source's split: the encoded image bytes
  (object [N]), each line's dict, and a name with the file's digest. Image paths are relative to
  the file's folder; data.eval_fraction of the lines are the eval split (by line hash). A record
  without 'image', a missing image or one that does not decode is a ValueError naming the line
  or the file."""
  path = config.data.source[len("files:"):]
  field = f"data.source={config.data.source!r}"
  if not os.path.isfile(path):
    raise ValueError(f"{field}: {path!r} is not a file (a JSONL file: one {{\"image\": PATH, "
                     f"\"caption\": TEXT}} per line)")
  records = examples.read_jsonl([path])
  if not records:
    raise ValueError(f"{field}: {path} holds no records")
  train, held = examples.hash_split(records, config.data.eval_fraction, field)
  chosen = held if split == "eval" else train
  folder = os.path.dirname(os.path.abspath(path))
  paths, values = [], []
  for record in chosen:
    if not isinstance(record.value, dict) or "image" not in record.value:
      raise ValueError(f"{record.where}: the record has no 'image' field")
    image = os.path.join(folder, str(record.value["image"]))
    if not os.path.isfile(image):
      raise ValueError(f"{record.where}: image {record.value['image']!r} does not exist "
                       f"(looked for {image})")
    paths.append(image)
    values.append({**record.value, "where": record.where})
  if not paths:
    raise ValueError(f"{field}: no {split} pairs (data.eval_fraction="
                     f"{config.data.eval_fraction})")
  raw = np.empty(len(paths), dtype=object)
  raw[:] = [sources.read_file(p) for p in paths]
  image_input.check_decodes(raw, paths)
  digest = hashlib.sha256(sources.read_file(path)).hexdigest()[:16]
  return raw, values, f"{config.data.source} {split} {len(paths)} sha256:{digest}"


def _jsonl(config, split: str) -> PairSet:
  """A JSONL file of image paths with captions or question/answer pairs, read into memory."""
  raw, values, identity = read_jsonl_images(config, split)
  texts = [_record_text(value, value["where"], config.data.text) for value in values]
  return PairSet(raw, texts, identity)


def _tfds_builder(config):
  kind(config)
  return sources.checked_tfds_builder(config, ("image_feature", "caption_feature"))


def _tfds_dataset(config, builder, split: str):
  """(encoded image bytes, caption string) pairs of a split, in file order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  image, caption = config.data.image_feature, config.data.caption_feature.split("/")
  decoders = ({image: tfds.decode.SkipDecoding()}
              if isinstance(builder.info.features[image], tfds.features.Image) else None)
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)

  def pair(example):
    text = example
    for part in caption:
      text = text[part]
    text = tf.reshape(text, [-1])[0]  # a list of captions: the first
    return example[image], text
  return ds.map(pair)


def _tfds_eval(config, builder) -> PairSet:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  count = config.eval.steps * config.batch_size
  pairs = list(tfds.as_numpy(_tfds_dataset(config, builder, config.data.eval_split).take(count)))
  raw = np.empty(len(pairs), dtype=object)
  raw[:] = [p[0] for p in pairs]
  return PairSet(raw, [p[1].decode("utf-8", "replace") for p in pairs],
                 f"{config.data.source} {config.data.eval_split}")


def read_split(config, split: str) -> PairSet:
  """The in-memory 'train' or 'eval' split (TFDS: eval only)."""
  name, _ = kind(config)
  if name == "scenes":
    return _scenes(config, split)
  if name == "files":
    return _jsonl(config, split)
  return _tfds_eval(config, _tfds_builder(config))


# ---------------------------------------------------------------- texts

def make_tokenizer(config):
  from foundation import data  # pylint: disable=g-import-not-at-top
  return data.make_tokenizer(config.data.tokenizer)


def tokenize(texts, tokenizer, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [N, length] ids, int32 [N, length] segments): [BOS] text [EOS], cut, right-padded."""
  ids = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  segments = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    row = ([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id])[:length]
    ids[i, :len(row)] = row
    segments[i, :len(row)] = 1
  return ids, segments


def _builder(data: PairSet, ids: np.ndarray, segments: np.ndarray, pp):
  """build(rows) for EpochIterator / eval_batches: rows are (index, epoch) or () (padding)."""
  def build(rows) -> dict[str, np.ndarray]:
    real = np.array([bool(r) for r in rows])
    index = np.array([r[0] if r else 0 for r in rows], np.int64)
    epoch = np.array([r[1] if r else 0 for r in rows], np.int64)
    return {"image": pp(data.raw[index], epoch, index),
            "text": ids[index],
            "text_segments": np.where(real[:, None], segments[index], 0).astype(np.int32),
            "label_mask": real.astype(np.int32)}
  return build


# ---------------------------------------------------------------- public

def make_train_iterator(config, process_index: int,
                        process_count: int) -> iterators.DataIterator:
  """This host's endless train batches, with save/restore for exact resume."""
  name, _ = kind(config)
  if name == "tfds":
    return TfdsIterator(config, process_index, process_count)
  data = read_split(config, "train")
  tokenizer = make_tokenizer(config)
  ids, segments = tokenize(data.texts, tokenizer, int(config.data.text_len))
  pp = image_input.Preprocess(config, config.data.pp_train, "data.pp_train")
  pp.check(data.raw[0])
  count = len(data.texts)

  def plan(epoch: int) -> examples.Rows:
    return [(int(i), epoch) for i in examples.shuffled(count, config.seed, 0, epoch)]
  identity = {"data": data.identity, "seed": int(config.seed), "pp_train": config.data.pp_train,
              "text_len": int(config.data.text_len), "tokenizer": str(config.data.tokenizer)}
  description = {"sources": [[config.data.source, 1.0]], "position_kind": "image-text",
                 "process_count": process_count, "num_examples": count}
  return examples.EpochIterator(plan, _builder(data, ids, segments, pp), config.batch_size,
                                process_index, process_count, identity, description)


def eval_batches(config, process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
  """This host's share of at most eval.steps eval batches."""
  data = read_split(config, "eval")
  if not data.texts:
    raise ValueError(f"data.source={config.data.source!r}: the eval split is empty")
  ids, segments = tokenize(data.texts, make_tokenizer(config), int(config.data.text_len))
  pp = image_input.Preprocess(config, config.data.pp_eval, "data.pp_eval")
  pp.check(data.raw[0])
  rows = [(i, 0) for i in range(len(data.texts))]
  return examples.eval_batches(rows, _builder(data, ids, segments, pp), config, process_index,
                               process_count)


class TfdsIterator(iterators.TfDataIterator):
  """A TFDS train split through tf.data, this host's shard; captions tokenized on the host."""

  def __init__(self, config, process_index: int, process_count: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from foundation.data import pipeline  # pylint: disable=g-import-not-at-top
    self.process_index, self.process_count = process_index, process_count
    self.tokenizer, self.text_len = make_tokenizer(config), int(config.data.text_len)
    host_batch = pipeline.host_batch_size(config, process_count)
    builder = _tfds_builder(config)
    pp = image_input.Preprocess(config, config.data.pp_train, "data.pp_train")
    chain = pp._one  # pylint: disable=protected-access

    def process(position, pair):
      raw, text = pair
      image = chain((raw, tf.constant(process_index, tf.int64), position))
      return {"image": tf.ensure_shape(image, pp.shape), "caption": text}

    ds = _tfds_dataset(config, builder, config.data.train_split).shard(process_count,
                                                                        process_index)
    ds = ds.repeat().enumerate().shuffle(config.data.shuffle_buffer, seed=int(config.seed))
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True).prefetch(config.data.prefetch)
    self._iterator = iter(ds.with_options(pipeline._options()))  # pylint: disable=protected-access
    self._description = {"sources": [[config.data.source, 1.0]],
                         "position_kind": "image-text-tfds", "process_count": process_count}
    self.steps = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    texts = [t.decode("utf-8", "replace") for t in batch["caption"].numpy()]
    ids, segments = tokenize(texts, self.tokenizer, self.text_len)
    self.steps += 1
    image = batch["image"].numpy()
    return {"image": image, "text": ids, "text_segments": segments,
            "label_mask": np.ones(len(image), np.int32)}
