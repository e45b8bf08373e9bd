"""Audio front-end ops (tf.data), composed from a config string as image_ops' chains:

  compose("decode|resample|random_crop|log_mel|standardize|freq_mask(8)|time_mask(12)", frontend)
    -> fn(raw, rate, seed) -> float32 [frames, mel_bins]

An op is `name` or `name(args)` with Python literal arguments; ops run left to right on one
example, whose state is {'audio': waveform [samples] or spectrogram [frames, mel], 'rate': int32}.
Each is a factory in OPS: `factory(frontend, *args) -> op(example, seed) -> example`; `frontend`
(FrontEnd, from config.data) holds the rate, window, hop, mel bins and clip length the ops use
unless their arguments say otherwise.

Random ops are stateless: `seed` is an int64 [2] tensor per example (image_ops.example_seed of
(config.seed, epoch, index)), op i of the chain draws from fold_in(seed, i); a resumed run sees
the same crops and masks.
"""

import dataclasses
from typing import Any, Callable

import tensorflow as tf

from foundation.data import op_chain

Example = dict[str, tf.Tensor]
Op = Callable[[Example, tf.Tensor], Example]
LOG_FLOOR = 1e-6  # log(mel power + LOG_FLOOR): silence is log(1e-6) = -13.8, not -inf


@dataclasses.dataclass(frozen=True)
class FrontEnd:
  """The signal settings of config.data the ops read."""
  sample_rate: int = 16_000   # Hz, after `resample`
  window: int = 400           # STFT frame length in samples (a periodic Hann window)
  hop: int = 160              # STFT frame step in samples
  fft_length: int = 512       # >= window
  mel_bins: int = 128
  fmin: float = 0.0           # the mel filterbank's edges, Hz
  fmax: float = 0.0           # 0: sample_rate / 2
  clip_seconds: float = 1.0   # what random_crop / center_crop / pad cut or pad to

  @classmethod
  def from_config(cls, data: Any) -> "FrontEnd":
    return cls(**{f.name: type(f.default)(data[f.name]) for f in dataclasses.fields(cls)})

  @property
  def clip_samples(self) -> int:
    return int(round(self.clip_seconds * self.sample_rate))

  @property
  def frames(self) -> int:
    """Frames of a clip_samples clip: the STFT pads the end (ceil(samples / hop))."""
    return -(-self.clip_samples // self.hop)

  @property
  def upper_hz(self) -> float:
    return self.fmax or self.sample_rate / 2

  def check(self) -> None:
    """ValueError naming the field when the settings cannot make a spectrogram."""
    for name in ("sample_rate", "window", "hop", "fft_length", "mel_bins"):
      if getattr(self, name) <= 0:
        raise ValueError(f"data.{name}={getattr(self, name)} must be > 0")
    if self.fft_length < self.window:
      raise ValueError(f"data.fft_length={self.fft_length} is shorter than data.window="
                       f"{self.window}")
    if self.clip_seconds <= 0 or self.clip_samples < self.window:
      raise ValueError(f"data.clip_seconds={self.clip_seconds} ({self.clip_samples} samples) is "
                       f"shorter than one data.window={self.window}")
    if not 0 <= self.fmin < self.upper_hz <= self.sample_rate / 2:
      raise ValueError(f"data.fmin={self.fmin} and data.fmax={self.fmax} must satisfy 0 <= fmin < "
                       f"fmax <= data.sample_rate / 2 = {self.sample_rate / 2}")


def _seconds(frontend: FrontEnd, seconds) -> int:
  return frontend.clip_samples if seconds is None else int(round(seconds * frontend.sample_rate))


# ---------------------------------------------------------------- waveform ops

def decode(frontend: FrontEnd) -> Op:
  """WAV bytes -> float32 [samples] in [-1, 1] (channels averaged to mono) and the file's rate;
  int16 PCM -> / 32768; a float waveform passes through."""
  del frontend

  def op(ex, seed):
    del seed
    audio = ex["audio"]
    if audio.dtype == tf.string:
      wav = tf.audio.decode_wav(audio)
      return {"audio": tf.reduce_mean(wav.audio, axis=-1), "rate": wav.sample_rate}
    if audio.dtype.is_integer:
      return {**ex, "audio": tf.cast(audio, tf.float32) / 32768.0}
    return {**ex, "audio": tf.cast(audio, tf.float32)}
  return op


def resample_to(audio: tf.Tensor, rate: tf.Tensor, target: int) -> tf.Tensor:
  """Band-limited resampling by the FFT (scipy.signal.resample's method): the spectrum of the
  whole clip truncated (down) or zero-padded (up) to round(samples * target / rate) samples."""
  n = tf.shape(audio, out_type=tf.int64)[0]
  rate = tf.cast(rate, tf.int64)
  n_out = (n * target + rate // 2) // rate
  spectrum = tf.signal.rfft(audio, tf.cast(n[None], tf.int32))
  bins = n_out // 2 + 1
  kept = spectrum[:tf.minimum(bins, tf.shape(spectrum, out_type=tf.int64)[0])]
  kept = tf.pad(kept, [[0, bins - tf.shape(kept, out_type=tf.int64)[0]]])
  out = tf.signal.irfft(kept, tf.cast(n_out[None], tf.int32))
  return out * tf.cast(n_out, tf.float32) / tf.cast(n, tf.float32)


def resample(frontend: FrontEnd, rate: int | None = None) -> Op:
  """To `rate` (default data.sample_rate) when the clip's rate differs (resample_to)."""
  target = int(rate or frontend.sample_rate)

  def op(ex, seed):
    del seed
    audio = tf.cond(tf.equal(tf.cast(ex["rate"], tf.int64), target), lambda: ex["audio"],
                    lambda: resample_to(ex["audio"], ex["rate"], target))
    return {"audio": audio, "rate": tf.constant(target, tf.int32)}
  return op


def pad(frontend: FrontEnd, seconds: float | None = None) -> Op:
  """Zeros after the end up to `seconds` (default data.clip_seconds); longer clips unchanged."""
  size = None if seconds is None else seconds

  def op(ex, seed):
    del seed
    length = _seconds(frontend, size)
    short = tf.maximum(length - tf.shape(ex["audio"])[0], 0)
    return {**ex, "audio": tf.pad(ex["audio"], [[0, short]])}
  return op


def crop_offset(length: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """random_crop's start: uniform over the valid starts 0..length - size."""
  return tf.random.stateless_uniform([], seed, 0, length - size + 1, dtype=tf.int32)


def _checked_length(ex, size: int) -> tf.Tensor:
  length = tf.shape(ex["audio"])[0]
  tf.debugging.assert_greater_equal(length, size, message=(
      f"a clip is shorter than data.clip_seconds ({size} samples)"))
  return length


def random_crop(frontend: FrontEnd, seconds: float | None = None) -> Op:
  """A window of `seconds` (default data.clip_seconds) at a uniformly random start."""
  def op(ex, seed):
    size = _seconds(frontend, seconds)
    start = crop_offset(_checked_length(ex, size), size, seed)
    return {**ex, "audio": ex["audio"][start:start + size]}
  return op


def center_crop(frontend: FrontEnd, seconds: float | None = None) -> Op:
  """The central window of `seconds` (default data.clip_seconds): start (length - size) // 2."""
  def op(ex, seed):
    del seed
    size = _seconds(frontend, seconds)
    start = (_checked_length(ex, size) - size) // 2
    return {**ex, "audio": ex["audio"][start:start + size]}
  return op


# ---------------------------------------------------------------- spectrogram ops

def mel_matrix(frontend: FrontEnd) -> tf.Tensor:
  """float32 [fft_length // 2 + 1, mel_bins]: HTK-mel triangles (tf.signal's)."""
  return tf.signal.linear_to_mel_weight_matrix(
      frontend.mel_bins, frontend.fft_length // 2 + 1, frontend.sample_rate, frontend.fmin,
      frontend.upper_hz)


def log_mel_of(audio: tf.Tensor, frontend: FrontEnd) -> tf.Tensor:
  """float32 [ceil(samples / hop), mel_bins]: log(|STFT|^2 @ mel + 1e-6); periodic Hann window,
  the end zero-padded to whole frames."""
  stft = tf.signal.stft(audio, frame_length=frontend.window, frame_step=frontend.hop,
                        fft_length=frontend.fft_length, window_fn=tf.signal.hann_window,
                        pad_end=True)
  power = tf.math.real(stft) ** 2 + tf.math.imag(stft) ** 2
  return tf.math.log(tf.matmul(power, mel_matrix(frontend)) + LOG_FLOOR)


def log_mel(frontend: FrontEnd) -> Op:
  """Waveform -> log-mel spectrogram [frames, mel_bins] (log_mel_of)."""
  def op(ex, seed):
    del seed
    return {**ex, "audio": log_mel_of(ex["audio"], frontend)}
  return op


def standardize(frontend: FrontEnd, eps: float = 1e-5) -> Op:
  """Per clip: (x - mean) / (std + eps) over all of it (silence and loudness set aside)."""
  del frontend

  def op(ex, seed):
    del seed
    x = ex["audio"]
    mean = tf.reduce_mean(x)
    std = tf.sqrt(tf.reduce_mean(tf.square(x - mean)))
    return {**ex, "audio": (x - mean) / (std + eps)}
  return op


def mask_bounds(seed: tf.Tensor, size, max_width: int, count: int) -> tuple[tf.Tensor, tf.Tensor]:
  """SpecAugment's masks along an axis of `size`: int32 [count] starts and widths, each width
  uniform in 0..max_width (at most size), each start uniform in 0..size - width."""
  size = tf.cast(size, tf.int32)
  top = tf.minimum(max_width, size)
  widths = tf.random.stateless_uniform([count], seed, 0, top + 1, dtype=tf.int32)
  u = tf.random.stateless_uniform([count], tf.random.experimental.stateless_fold_in(seed, 1))
  starts = tf.cast(tf.floor(u * tf.cast(size - widths + 1, tf.float32)), tf.int32)
  return tf.minimum(starts, size - widths), widths


def _mask(axis: int, max_width: int, count: int, value: float) -> Callable:
  def op(ex, seed):
    x = ex["audio"]
    size = tf.shape(x)[axis]
    starts, widths = mask_bounds(seed, size, max_width, count)
    where = tf.range(size)[:, None]
    hit = tf.reduce_any((where >= starts[None]) & (where < (starts + widths)[None]), axis=1)
    hit = hit[:, None] if axis == 0 else hit[None, :]
    return {**ex, "audio": tf.where(hit, tf.cast(value, x.dtype), x)}
  return op


def time_mask(frontend: FrontEnd, max_width: int, count: int = 1, value: float = 0.0) -> Op:
  """SpecAugment (Park et al. 2019): `count` bands of 0..max_width frames set to `value`."""
  del frontend
  return _mask(0, int(max_width), int(count), value)


def freq_mask(frontend: FrontEnd, max_width: int, count: int = 1, value: float = 0.0) -> Op:
  """SpecAugment: `count` bands of 0..max_width mel bins set to `value`."""
  del frontend
  return _mask(1, int(max_width), int(count), value)


OPS: dict[str, Callable[..., Op]] = {
    "decode": decode,
    "resample": resample,
    "pad": pad,
    "random_crop": random_crop,
    "center_crop": center_crop,
    "log_mel": log_mel,
    "standardize": standardize,
    "time_mask": time_mask,
    "freq_mask": freq_mask,
}


# ---------------------------------------------------------------- the chain

def parse(spec: str, field: str = "pp") -> list[tuple[str, tuple, dict]]:
  """'a|b(1, x=2)' -> [('a', (), {}), ('b', (1,), {'x': 2})] over these ops (op_chain.parse)."""
  return op_chain.parse(spec, OPS, field)


def compose(spec: str, frontend: FrontEnd, field: str = "pp") -> Callable:
  """The op chain of `spec` as one fn(raw, rate, seed int64 [2]) -> the final 'audio' tensor."""
  ops = []
  for name, args, kwargs in parse(spec, field):
    try:
      ops.append(OPS[name](frontend, *args, **kwargs))
    except TypeError as e:
      raise ValueError(f"{field}={spec!r}: {name}{args or ''}: {e}") from None

  def fn(raw, rate, seed):
    ex = {"audio": tf.convert_to_tensor(raw), "rate": tf.cast(rate, tf.int32)}
    seed = tf.convert_to_tensor(seed, tf.int64)
    for i, op in enumerate(ops):
      ex = op(ex, tf.random.experimental.stateless_fold_in(seed, i))
    return ex["audio"]
  return fn
