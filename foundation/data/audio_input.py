"""Audio input: batches {'spectrogram': float32 [b, frames, mel_bins], 'label': int32 [b],
'label_mask': int32 [b]} (+ 'noise': float32 [b, patches] for masked modelling; b = batch_size /
process_count) from `data.source`:

  'embedded'    the sounds synthesised by sounds.py (offline; data.num_train / data.num_eval clips
                of data.sound_seconds at data.sample_rate)
  'files:DIR'   one sub-folder per class (class ids: the sorted folder names) of WAV files; eval
                reads DIR/<data.eval_split>/ when it exists, else holds out data.eval_fraction of
                each class's files (by name hash)
  'tfds:NAME'   a prepared TFDS dataset (speech_commands, crema_d, ...): features
                data.audio_feature / data.label_feature, splits data.train_split / eval_split,
                under data.tfds_data_dir

The front end is audio_ops chains: data.pp_train on train clips, data.pp_eval on eval ones,
with the signal settings (rate, window, hop, mel bins, clip length) from config.data; their
output must be [frames, mel_bins] (frames = ceil(clip samples / hop)).

Every file is decoded once when the run starts: a file that is not WAV, one at another rate
than data.sample_rate when data.resample is False, or one shorter than data.clip_seconds (unless
the chain pads) stops the run with one line naming it.

Positions resume exactly as the image input's: embedded and files sets live in memory and use
examples.EpochIterator (a global (epoch, row), any host count; an example's random ops and its
patch noise are seeded by (config.seed, epoch, index)); TFDS streams through tf.data, each host
its shard, and saves tf.data's own iterator checkpoint.
"""

import dataclasses

import ml_collections
import numpy as np

from foundation.data import class_folders
from foundation.data import examples
from foundation.data import iterators
from foundation.data import sounds
from foundation.data import sources

AUDIO_EXTENSIONS = (".wav", ".flac")


def audio_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields of the audio tasks (the configs place them)."""
  return ml_collections.ConfigDict(dict(
      source="embedded",       # 'embedded' (sounds.py), 'files:DIR' or 'tfds:NAME'
      sample_rate=8000,        # Hz: clips are resampled to it (audio_ops.FrontEnd)
      resample=True,           # False: a clip at another rate is an error naming it
      window=256,              # STFT frame (samples), periodic Hann
      hop=128,                 # STFT step (samples)
      fft_length=256,
      mel_bins=32,
      fmin=0.0,                # mel filterbank edges (Hz); fmax 0: sample_rate / 2
      fmax=0.0,
      clip_seconds=1.024,      # crop length: frames = ceil(clip samples / hop) (64 here)
      # audio_ops chains (foundation/data/audio_ops.py)
      pp_train="decode|resample|random_crop|log_mel|standardize|freq_mask(4)|time_mask(8)",
      pp_eval="decode|resample|center_crop|log_mel|standardize",
      classes="",              # embedded/files: keep these comma-separated class names ('' all)
      audio_feature="audio",   # TFDS feature names
      label_feature="label",
      train_split="train",     # TFDS splits; files: eval_split is the sub-folder of eval clips
      eval_split="test",
      tfds_data_dir="",
      eval_fraction=0.1,       # files without an eval_split folder: the share held out per class
      num_train=sounds.NUM_TRAIN,  # embedded: clips synthesised for train and for eval
      num_eval=sounds.NUM_EVAL,
      sound_seconds=sounds.SECONDS,
      shuffle_buffer=10_000,   # TFDS: examples
      prefetch=2,
  ))


@dataclasses.dataclass(frozen=True)
class AudioSet:
  """An in-memory split: `raw` int16 [N, samples] PCM or object [N] WAV bytes."""
  raw: np.ndarray
  rates: np.ndarray         # int32 [N] Hz
  labels: np.ndarray        # int32 [N]
  class_names: tuple[str, ...]
  identity: str             # what the data is, for the resume check


def frontend(config):
  from foundation.data import audio_ops  # pylint: disable=g-import-not-at-top
  return audio_ops.FrontEnd.from_config(config.data)


# ---------------------------------------------------------------- sources

def _kind(config) -> tuple[str, str]:
  spec = config.data.source
  kind, _, arg = spec.partition(":")
  if kind not in ("embedded", "tfds", "files") or (kind != "embedded" and not arg):
    raise ValueError(f"data.source={spec!r} is not an audio source; use 'embedded', "
                     f"'files:DIR' or 'tfds:NAME'")
  return kind, arg


def _embedded(config, split: str) -> AudioSet:
  d = config.data
  count = d.num_train if split == "train" else d.num_eval
  clips, labels = sounds.load(split, 0, int(count), int(d.sample_rate), float(d.sound_seconds))
  return AudioSet(clips, np.full(len(labels), d.sample_rate, np.int32), labels,
                  sounds.CLASS_NAMES,
                  f"embedded sounds {d.sample_rate}Hz {d.sound_seconds}s {split} {count}")


def _files(config, split: str) -> AudioSet:
  """A class-folder tree read into memory (foundation/data/class_folders.py)."""
  data = class_folders.read(config, split, AUDIO_EXTENSIONS, "audio files")
  rates = np.array([check_clip(config, path, raw) for path, raw in zip(data.paths, data.raw)],
                   np.int32)
  return AudioSet(data.raw, rates, data.labels, data.names, data.identity)


def check_clip(config, where: str, data: bytes) -> int:
  """The clip's sample rate, after checking that it decodes, that its rate is data.sample_rate
  when data.resample is False, and that it lasts data.clip_seconds (unless pp_train pads)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  d = config.data
  if where.lower().endswith(".flac"):
    raise ValueError(f"{where}: FLAC needs a decoder this environment does not have (TensorFlow "
                     f"reads WAV only); convert it to WAV, e.g. ffmpeg -i in.flac out.wav")
  try:
    wav = tf.audio.decode_wav(data)
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f"{where} is not a PCM WAV file ({e.message.splitlines()[0]})") from None
  rate, samples = int(wav.sample_rate), int(wav.audio.shape[0])
  if rate != d.sample_rate and not d.resample:
    raise ValueError(f"{where} has sample rate {rate} Hz but data.sample_rate={d.sample_rate} and "
                     f"data.resample=False; resample the file or set --config.data.resample=True")
  seconds = samples / rate
  pads = "pad" in [p.strip().split("(")[0] for p in d.pp_train.split("|")]
  if seconds + 1e-9 < d.clip_seconds and not pads:
    raise ValueError(f"{where} is {seconds:.3f} s long, shorter than data.clip_seconds="
                     f"{d.clip_seconds}; lower data.clip_seconds or add 'pad' before the crop in "
                     f"data.pp_train / pp_eval")
  return rate


def _tfds_builder(config):
  _kind(config)
  builder = sources.checked_tfds_builder(config, ("audio_feature", "label_feature"))
  features = builder.info.features
  rate = int(getattr(features[config.data.audio_feature], "sample_rate", None) or 0)
  if rate and rate != config.data.sample_rate and not config.data.resample:
    raise ValueError(f"data.source={config.data.source!r} has sample rate {rate} Hz but "
                     f"data.sample_rate={config.data.sample_rate} and data.resample=False")
  return builder, rate or int(config.data.sample_rate)


def _tfds_dataset(config, builder, split: str):
  ds = builder.as_dataset(split=split, shuffle_files=False)
  audio, label = config.data.audio_feature, config.data.label_feature
  return ds.map(lambda ex: (ex[audio], ex[label]))


def _tfds_eval(config) -> AudioSet:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, rate = _tfds_builder(config)
  count = config.eval.steps * config.batch_size
  pairs = list(tfds.as_numpy(_tfds_dataset(config, builder, config.data.eval_split).take(count)))
  raw = np.empty(len(pairs), dtype=object)
  raw[:] = [sounds.wav_bytes(np.asarray(p[0]).reshape(-1), rate) for p in pairs]
  return AudioSet(raw, np.full(len(pairs), rate, np.int32),
                  np.array([p[1] for p in pairs], np.int32),
                  class_folders.tfds_names(config, builder),
                  f"{config.data.source} {config.data.eval_split}")


def read_split(config, split: str) -> AudioSet:
  """The in-memory 'train' or 'eval' split of an embedded or files source (TFDS: eval only)."""
  kind, _ = _kind(config)
  if kind == "embedded":
    data = _embedded(config, split)
  elif kind == "files":
    data = _files(config, split)
  else:
    data = _tfds_eval(config)
  data = class_folders.only_classes(data, config.data.get("classes", ""), kind)
  class_folders.check_labels(config, data.labels, data.class_names, f"the {split} split",
                             headless_ok=True)
  return data


# ---------------------------------------------------------------- the front end

class Preprocess:
  """A pp chain applied to a batch of in-memory clips inside one traced tf.function: the ops run
  per clip (tf.map_fn), each seeded by example_seed(seed, epoch, index). With `noise_size`, each
  clip also gets float32 [noise_size] uniform noise from the same seed (masked modelling: which
  patches are hidden)."""

  def __init__(self, config, spec: str, field: str, noise_size: int = 0):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from foundation.data import audio_ops  # pylint: disable=g-import-not-at-top
    from foundation.data import image_ops  # pylint: disable=g-import-not-at-top
    fe = frontend(config)
    self.shape = (fe.frames, fe.mel_bins)
    self.spec, self.field, self.seed = spec, field, int(config.seed)
    chain = audio_ops.compose(spec, fe, field)
    shape, seed_value = self.shape, self.seed

    def one(args):
      raw, rate, epoch, index = args
      seed = image_ops.example_seed(seed_value, epoch, index)
      spectrogram = tf.cast(chain(raw, rate, seed), tf.float32)
      out = {"spectrogram": tf.ensure_shape(spectrogram, shape)}
      if noise_size:
        noise_seed = tf.random.experimental.stateless_fold_in(seed, 1_000_003)
        out["noise"] = tf.random.stateless_uniform([noise_size], noise_seed)
      return out

    signature = {"spectrogram": tf.TensorSpec(shape, tf.float32)}
    if noise_size:
      signature["noise"] = tf.TensorSpec([noise_size], tf.float32)

    @tf.function
    def batch(raw, rates, epochs, indices):
      return tf.map_fn(one, (raw, rates, epochs, indices), fn_output_signature=signature)
    self._one, self._batch = one, batch

  def check(self, raw_example, rate) -> None:
    """The chain's output on one clip has the configured shape."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      self._one((raw_example, np.int32(rate), np.int64(0), np.int64(0)))
    except (ValueError, tf.errors.InvalidArgumentError) as e:
      text = getattr(e, "message", str(e)).splitlines()[0]
      raise ValueError(f"{self.field}={self.spec!r} does not give spectrograms of data.frames x "
                       f"mel_bins = {self.shape} ({text})") from None

  def __call__(self, raw, rates, epochs, indices) -> dict[str, np.ndarray]:
    if raw.dtype == object:
      raw = raw.astype(bytes)  # a tf.string tensor
    out = self._batch(raw, rates.astype(np.int32), epochs.astype(np.int64),
                      indices.astype(np.int64))
    return {k: v.numpy() for k, v in out.items()}


def _builder(data: AudioSet, pp: Preprocess):
  """build(rows) for EpochIterator / eval_batches: rows are (index, epoch) or () (padding)."""
  def build(rows) -> dict[str, np.ndarray]:
    real = np.array([bool(r) for r in rows])
    index = np.array([r[0] if r else 0 for r in rows], np.int64)
    epoch = np.array([r[1] if r else 0 for r in rows], np.int64)
    return {**pp(data.raw[index], data.rates[index], epoch, index),
            "label": np.where(real, data.labels[index], 0).astype(np.int32),
            "label_mask": real.astype(np.int32)}
  return build


# ---------------------------------------------------------------- public

def make_train_iterator(config, process_index: int, process_count: int,
                        noise_size: int = 0) -> iterators.DataIterator:
  """This host's endless train batches, with save/restore for exact resume."""
  frontend(config).check()
  kind, _ = _kind(config)
  if kind == "tfds":
    return TfdsIterator(config, process_index, process_count, noise_size)
  data = read_split(config, "train")
  pp = Preprocess(config, config.data.pp_train, "data.pp_train", noise_size)
  pp.check(data.raw[0], data.rates[0])
  count = len(data.labels)

  def plan(epoch: int) -> examples.Rows:
    order = examples.shuffled(count, config.seed, 0, epoch)
    return [(int(i), epoch) for i in order]
  d = config.data
  identity = {"data": data.identity, "seed": int(config.seed), "pp_train": d.pp_train,
              "frontend": [d.sample_rate, d.window, d.hop, d.fft_length, d.mel_bins,
                           d.clip_seconds], "noise_size": noise_size}
  description = {"sources": [[d.source, 1.0]], "position_kind": "global",
                 "process_count": process_count, "num_examples": count}
  return examples.EpochIterator(plan, _builder(data, pp), config.batch_size, process_index,
                                process_count, identity, description)


def eval_batches(config, process_index: int, process_count: int,
                 noise_size: int = 0) -> list[dict[str, np.ndarray]]:
  """This host's share of at most eval.steps eval batches (image_input's layout)."""
  frontend(config).check()
  data = read_split(config, "eval")
  if not len(data.labels):
    raise ValueError(f"data.source={config.data.source!r}: the eval split is empty")
  pp = Preprocess(config, config.data.pp_eval, "data.pp_eval", noise_size)
  pp.check(data.raw[0], data.rates[0])
  rows = [(i, 0) for i in range(len(data.labels))]
  return examples.eval_batches(rows, _builder(data, pp), config, process_index, process_count)


def class_names(config) -> tuple[str, ...]:
  kind, _ = _kind(config)
  if kind == "embedded":
    return sounds.CLASS_NAMES
  if kind == "files":
    directory = config.data.source[len("files:"):]
    names = class_folders.class_names(directory, f"data.source={config.data.source!r}",
                                        "audio files")
    return tuple(n for n in names if n != config.data.eval_split)
  return class_folders.tfds_names(config, _tfds_builder(config)[0])


class TfdsIterator(iterators.TfDataIterator):
  """A TFDS train split through tf.data, this host's shard; the state is tf.data's checkpoint."""

  def __init__(self, config, process_index: int, process_count: int, noise_size: int = 0):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from foundation.data import pipeline  # pylint: disable=g-import-not-at-top
    self.process_index, self.process_count = process_index, process_count
    host_batch = pipeline.host_batch_size(config, process_count)
    builder, rate = _tfds_builder(config)
    class_folders.check_labels(config, np.zeros(0, np.int32),
                               class_folders.tfds_names(config, builder), "the train split",
                               headless_ok=True)
    pp = Preprocess(config, config.data.pp_train, "data.pp_train", noise_size)
    num_classes = int(config.model.get("num_classes", 0)) or 2**31 - 1

    def process(position, pair):
      raw, label = pair
      tf.debugging.assert_less(tf.cast(label, tf.int32), num_classes, message=(
          f"a label of data.source={config.data.source!r} is outside model.num_classes="
          f"{num_classes}"))
      out = pp._one((tf.reshape(raw, [-1]), tf.constant(rate, tf.int32),  # pylint: disable=protected-access
                     tf.constant(process_index, tf.int64), position))
      return {**out, "label": tf.cast(label, tf.int32), "label_mask": tf.constant(1, tf.int32)}

    ds = _tfds_dataset(config, builder, config.data.train_split).shard(process_count,
                                                                        process_index)
    ds = ds.repeat().enumerate().shuffle(config.data.shuffle_buffer, seed=int(config.seed))
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True).prefetch(config.data.prefetch)
    ds = ds.with_options(pipeline._options())  # pylint: disable=protected-access
    self._iterator = iter(ds)
    self._description = {"sources": [[config.data.source, 1.0]], "position_kind": "audio-tfds",
                         "process_count": process_count}
    self.steps = 0

  def __next__(self) -> dict[str, np.ndarray]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      batch = {k: v.numpy() for k, v in next(self._iterator).items()}
    except tf.errors.InvalidArgumentError as e:
      raise iterators.input_error(e.message.split("\n")[0]) from None
    self.steps += 1
    return batch
