"""The embedded audio set: twelve kinds of sound synthesised in numpy, so audio runs work offline.

Each clip is one sound (CLASS_NAMES) with random pitch, rate, timing and loudness over a little
white background noise; int16 PCM [samples] at the requested rate. Everything is a pure function
of (seed, split, rate, seconds, count): numpy's PCG64 streams are fixed across versions and
machines. Train and eval come from different streams, so no eval clip is a train clip.

Every kind repeats or lasts through the clip (rhythms at 2 or more events a second), so any
crop of a second or so shows what it is.
"""

import functools

import numpy as np

CLASS_NAMES = ("tone", "chord", "chirp_up", "chirp_down", "noise_bursts", "white_noise",
               "clicks", "beeps", "tremolo", "vibrato", "harmonic", "rumble")
NUM_CLASSES = len(CLASS_NAMES)
NUM_TRAIN = 3_000
NUM_EVAL = 600
SECONDS = 1.5
_SPLITS = {"train": 0, "eval": 1}


def _sine(freq, t, phase=0.0):
  return np.sin(2 * np.pi * freq * t + phase)


def _events(rng, seconds: float, rate_lo: float, rate_hi: float, jitter: float) -> np.ndarray:
  """Event start times (s): a random rate in [rate_lo, rate_hi] per second, each start moved by
  up to `jitter` of the period (0: a strict rhythm)."""
  period = 1.0 / rng.uniform(rate_lo, rate_hi)
  starts = np.arange(rng.uniform(0, period), seconds, period)
  return starts + rng.uniform(-jitter, jitter, len(starts)) * period


def _gate(t: np.ndarray, starts: np.ndarray, length: float) -> np.ndarray:
  """1 inside [start, start + length) of any event, else 0."""
  on = np.zeros_like(t)
  for s in starts:
    on[(t >= s) & (t < s + length)] = 1.0
  return on


def synthesise(kind: int, rng: np.random.Generator, rate: int, seconds: float) -> np.ndarray:
  """float32 [round(seconds * rate)] in about [-1, 1]: one clip of CLASS_NAMES[kind]."""
  n = int(round(seconds * rate))
  t = np.arange(n) / rate
  nyquist = rate / 2
  top = min(3000.0, 0.7 * nyquist)           # the highest fundamental that stays below Nyquist
  name = CLASS_NAMES[kind]
  phase = rng.uniform(0, 2 * np.pi)
  if name == "tone":
    x = _sine(rng.uniform(200, top), t, phase)
  elif name == "chord":                    # a major or minor triad
    f = rng.uniform(150, top / 1.6)
    third = 1.26 if rng.random() < 0.5 else 1.19
    x = (_sine(f, t, phase) + _sine(f * third, t) + _sine(f * 1.5, t)) / 3
  elif name in ("chirp_up", "chirp_down"):  # a linear sweep over the whole clip
    lo, hi = rng.uniform(150, top / 3), rng.uniform(top / 1.5, top)
    f0, f1 = (lo, hi) if name == "chirp_up" else (hi, lo)
    x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)) + phase)
  elif name == "noise_bursts":             # irregular 40-120 ms bursts of white noise
    starts = _events(rng, seconds, 2.5, 4.5, 0.3)
    x = rng.standard_normal(n) * 0.4 * _gate(t, starts, rng.uniform(0.04, 0.12))
  elif name == "white_noise":
    x = rng.standard_normal(n) * 0.3
  elif name == "clicks":                   # a strict rhythm of 3 ms clicks
    starts = _events(rng, seconds, 3, 8, 0.0)
    x = _gate(t, starts, 0.003) * rng.choice([-1.0, 1.0], n)
  elif name == "beeps":                    # a rhythm of tone pulses
    starts = _events(rng, seconds, 2, 4, 0.0)
    x = _sine(rng.uniform(300, top), t, phase) * _gate(t, starts, rng.uniform(0.08, 0.15))
  elif name == "tremolo":                  # amplitude modulated at 3-8 Hz
    x = _sine(rng.uniform(200, top), t, phase) * (0.55 + 0.45 * _sine(rng.uniform(3, 8), t))
  elif name == "vibrato":                  # frequency modulated by 4-12% at 3-7 Hz
    f, depth, speed = rng.uniform(250, top / 1.15), rng.uniform(0.04, 0.12), rng.uniform(3, 7)
    x = np.sin(2 * np.pi * f * t + f * depth / speed * np.sin(2 * np.pi * speed * t) + phase)
  elif name == "harmonic":                 # a buzzy tone: harmonics 1..k at 1/h
    f = rng.uniform(100, 500)
    x = sum(_sine(h * f, t) / h for h in range(1, int(nyquist * 0.9 // f) + 1)) / 2
  else:                                    # rumble: white noise low-passed (a one-pole filter)
    from scipy import signal  # pylint: disable=g-import-not-at-top
    a = np.exp(-2 * np.pi * rng.uniform(60, 250) / rate)
    x = signal.lfilter([1 - a], [1, -a], rng.standard_normal(n))
    x *= 0.8 / max(np.abs(x).max(), 1e-6)
  gain = rng.uniform(0.2, 0.8)
  background = rng.standard_normal(n) * rng.uniform(0.002, 0.02)
  return (gain * x + background).astype(np.float32)


@functools.lru_cache(maxsize=8)
def load(split: str, seed: int = 0, count: int | None = None, rate: int = 8000,
         seconds: float = SECONDS) -> tuple[np.ndarray, np.ndarray]:
  """(clips int16 [N, round(seconds * rate)], labels int32 [N]) of 'train' or 'eval'; classes
  balanced, in a shuffled order. Cached: treat as read-only."""
  if split not in _SPLITS:
    raise ValueError(f"sounds split {split!r} is unknown; use 'train' or 'eval'")
  count = (NUM_TRAIN if split == "train" else NUM_EVAL) if count is None else count
  rng = np.random.default_rng([seed, _SPLITS[split], rate])
  labels = rng.permutation(np.arange(count) % NUM_CLASSES).astype(np.int32)
  clips = np.empty((count, int(round(seconds * rate))), np.int16)
  for i, kind in enumerate(labels):
    clips[i] = np.round(np.clip(synthesise(int(kind), rng, rate, seconds), -1, 1) * 32767)
  clips.flags.writeable = labels.flags.writeable = False
  return clips, labels


def wav_bytes(clip: np.ndarray, rate: int) -> bytes:
  """A mono 16-bit PCM WAV file of `clip` (int16, or float in [-1, 1]): for tests and examples."""
  import io  # pylint: disable=g-import-not-at-top
  import wave  # pylint: disable=g-import-not-at-top
  if clip.dtype != np.int16:
    clip = np.round(np.clip(clip, -1, 1) * 32767).astype(np.int16)
  out = io.BytesIO()
  with wave.open(out, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(int(rate))
    f.writeframes(clip.astype("<i2").tobytes())
  return out.getvalue()
