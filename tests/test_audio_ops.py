"""The audio front end against numpy references written here: WAV decoding, FFT resampling, the
log-mel spectrogram (framing, periodic Hann window, power spectrum, HTK mel filterbank), crops and
SpecAugment masks; a pure tone peaks in its mel bin at the frames where it sounds; the embedded
sounds are deterministic; the op chain's errors are one line."""

import numpy as np
import pytest
import tensorflow as tf

from foundation.data import audio_ops
from foundation.data import sounds

FE = audio_ops.FrontEnd(sample_rate=8000, window=256, hop=128, fft_length=256, mel_bins=32,
                        clip_seconds=1.024)


# ---------------------------------------------------------------- numpy references

def hz_to_mel(hz):
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
  return 700.0 * np.expm1(np.asarray(mel, np.float64) / 1127.0)


def ref_mel_matrix(fe: audio_ops.FrontEnd) -> np.ndarray:
  """Triangles on the HTK mel scale over the rfft bins' frequencies; the DC bin gets no weight."""
  bins = fe.fft_length // 2 + 1
  freqs = np.linspace(0, fe.sample_rate / 2, bins)[1:]
  mel = hz_to_mel(freqs)[:, None]
  edges = np.linspace(hz_to_mel(fe.fmin), hz_to_mel(fe.upper_hz), fe.mel_bins + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  weights = np.maximum(0, np.minimum((mel - lower) / (center - lower),
                                     (upper - mel) / (upper - center)))
  return np.concatenate([np.zeros((1, fe.mel_bins)), weights])


def ref_log_mel(x: np.ndarray, fe: audio_ops.FrontEnd) -> np.ndarray:
  """Frames of `window` every `hop` (the end zero-padded to ceil(n / hop) frames), a periodic
  Hann window, |rfft|^2, the mel matrix, log(. + 1e-6); float64."""
  frames = -(-len(x) // fe.hop)
  padded = np.zeros((frames - 1) * fe.hop + fe.window)
  padded[:len(x)] = x
  n = np.arange(fe.window)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / fe.window)
  rows = np.stack([padded[i * fe.hop:i * fe.hop + fe.window] * hann for i in range(frames)])
  power = np.abs(np.fft.rfft(rows, fe.fft_length)) ** 2
  return np.log(power @ ref_mel_matrix(fe) + 1e-6)


def ref_resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
  n = len(x)
  n_out = (n * target + rate // 2) // rate
  spectrum = np.fft.rfft(x)
  bins = n_out // 2 + 1
  kept = np.zeros(bins, complex)
  kept[:min(bins, len(spectrum))] = spectrum[:bins]
  return np.fft.irfft(kept, n_out) * n_out / n


def run(op, audio, rate=8000, seed=(1, 2)):
  out = op({"audio": tf.constant(audio), "rate": tf.constant(rate, tf.int32)},
           tf.constant(seed, tf.int64))
  return out["audio"].numpy()


# ---------------------------------------------------------------- the spectrogram

def test_mel_matrix_matches_the_reference():
  for fe in (FE, audio_ops.FrontEnd(16000, 400, 160, 512, 128, fmin=20.0, fmax=7600.0)):
    np.testing.assert_allclose(audio_ops.mel_matrix(fe).numpy(), ref_mel_matrix(fe), atol=5e-5)  # float32 mel arithmetic


def test_log_mel_matches_the_reference_to_float32_tolerance():
  rng = np.random.default_rng(0)
  t = np.arange(FE.clip_samples) / FE.sample_rate
  x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(len(t))).astype(np.float32)
  got = audio_ops.log_mel_of(tf.constant(x), FE).numpy()
  want = ref_log_mel(x.astype(np.float64), FE)
  assert got.shape == want.shape == (FE.frames, FE.mel_bins) == (64, 32)
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
  # an odd length: the end is padded to whole frames, as the reference does
  odd = x[:1000]
  np.testing.assert_allclose(audio_ops.log_mel_of(tf.constant(odd), FE).numpy(),
                             ref_log_mel(odd.astype(np.float64), FE), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("hz", [300.0, 1000.0, 2500.0])
def test_a_pure_tone_peaks_in_its_mel_bin_at_its_frames(hz):
  """A tone sounding from 0.25 s to 0.75 s: every frame wholly inside peaks in the mel bin whose
  centre is nearest the tone; every frame wholly outside is silence."""
  t = np.arange(FE.clip_samples) / FE.sample_rate
  on = (t >= 0.25) & (t < 0.75)
  x = np.where(on, 0.5 * np.sin(2 * np.pi * hz * t), 0.0).astype(np.float32)
  spec = audio_ops.log_mel_of(tf.constant(x), FE).numpy()
  edges = np.linspace(hz_to_mel(0), hz_to_mel(FE.sample_rate / 2), FE.mel_bins + 2)
  expected_bin = int(np.argmin(np.abs(mel_to_hz(edges[1:-1]) - hz)))
  start = np.arange(FE.frames) * FE.hop / FE.sample_rate
  end = start + FE.window / FE.sample_rate
  inside = (start >= 0.25) & (end <= 0.75)
  outside = (end <= 0.25) | (start >= 0.75)
  assert inside.sum() >= 25 and outside.sum() >= 25
  assert (spec[inside].argmax(axis=1) == expected_bin).all(), spec[inside].argmax(axis=1)
  assert spec[inside].max(axis=1).min() > 5.0        # loud where it sounds
  assert spec[outside].max() < np.log(1e-5)          # log(1e-6): silence elsewhere


# ---------------------------------------------------------------- waveform ops

def test_decode_reads_wav_and_pcm():
  clip = (np.random.default_rng(1).standard_normal(999) * 8000).astype(np.int16)
  out = audio_ops.decode(FE)({"audio": tf.constant(sounds.wav_bytes(clip, 22050)),
                              "rate": tf.constant(0)}, tf.constant([0, 0], tf.int64))
  assert int(out["rate"]) == 22050
  np.testing.assert_array_equal(out["audio"].numpy(), clip / 32768.0)
  np.testing.assert_array_equal(run(audio_ops.decode(FE), clip), clip / 32768.0)


@pytest.mark.parametrize("rate, target", [(16000, 8000), (8000, 16000), (22050, 8000)])
def test_resample_matches_the_reference_and_keeps_a_tone(rate, target):
  t = np.arange(int(0.5 * rate)) / rate
  x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
  got = run(audio_ops.resample(FE, target), x, rate)
  want = ref_resample(x.astype(np.float64), rate, target)
  assert got.shape == want.shape == ((len(x) * target + rate // 2) // rate,)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # away from the clip's ends (where the FFT's wrap-around rings), it is the tone sampled at the
  # new rate
  tone = np.sin(2 * np.pi * 1000 * np.arange(len(got)) / target)
  middle = slice(len(got) // 4, 3 * len(got) // 4)
  np.testing.assert_allclose(got[middle], tone[middle], atol=0.02)
  same = run(audio_ops.resample(FE, rate), x, rate)  # the rate already right: untouched
  np.testing.assert_array_equal(same, x)


def test_crops_and_pad():
  x = np.arange(10_000, dtype=np.float32)
  size = FE.clip_samples
  starts = set()
  for seed in range(20):
    got = run(audio_ops.random_crop(FE), x, seed=(seed, 0))
    start = int(got[0])
    np.testing.assert_array_equal(got, x[start:start + size])   # a window of the clip
    np.testing.assert_array_equal(run(audio_ops.random_crop(FE), x, seed=(seed, 0)), got)
    starts.add(start)
  assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= len(x) - size
  np.testing.assert_array_equal(run(audio_ops.center_crop(FE), x),
                                x[(len(x) - size) // 2:(len(x) - size) // 2 + size])
  padded = run(audio_ops.pad(FE), x[:100])
  assert padded.shape == (size,) and (padded[:100] == x[:100]).all() and not padded[100:].any()
  with pytest.raises(tf.errors.InvalidArgumentError, match="shorter than data.clip_seconds"):
    run(audio_ops.random_crop(FE), x[:100])


@pytest.mark.parametrize("axis, factory", [(0, audio_ops.time_mask), (1, audio_ops.freq_mask)])
def test_spec_augment_masks_match_the_reference(axis, factory):
  """The op sets the bands mask_bounds draws for its seed to the value, nothing else; the bands
  lie inside the axis, are at most max_width wide, and vary with the seed."""
  x = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32) + 5
  widths_seen = set()
  for s in range(30):
    seed = tf.constant([s, 7], tf.int64)
    got = run(factory(FE, 6, count=2, value=0.0), x, seed=(s, 7))
    starts, widths = (v.numpy() for v in audio_ops.mask_bounds(seed, x.shape[axis], 6, 2))
    want = x.copy()
    for start, width in zip(starts, widths):
      assert 0 <= width <= 6 and 0 <= start and start + width <= x.shape[axis]
      if axis == 0:
        want[start:start + width] = 0
      else:
        want[:, start:start + width] = 0
      widths_seen.add(int(width))
    np.testing.assert_array_equal(got, want)
  assert len(widths_seen) >= 5


def test_standardize():
  x = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32) * 3 + 7
  got = run(audio_ops.standardize(FE), x)
  np.testing.assert_allclose(got, (x - x.mean()) / (x.std() + 1e-5), atol=1e-5)


def test_compose_runs_a_chain_and_names_bad_ops():
  clip = np.round(np.sin(np.arange(12_000) / 3) * 10_000).astype(np.int16)
  chain = audio_ops.compose("decode|center_crop|log_mel", FE, "data.pp_eval")
  got = chain(clip, 8000, tf.constant([0, 0], tf.int64)).numpy()
  size = FE.clip_samples
  start = (len(clip) - size) // 2
  np.testing.assert_allclose(got, ref_log_mel(clip[start:start + size] / 32768.0, FE),
                             atol=1e-3, rtol=1e-4)
  with pytest.raises(ValueError, match=r"data.pp_train='decode\|log_mell': unknown op 'log_mell'; "
                                       r"did you mean 'log_mel'\?"):
    audio_ops.compose("decode|log_mell", FE, "data.pp_train")
  with pytest.raises(ValueError, match="data.fft_length=128 is shorter than data.window=256"):
    audio_ops.FrontEnd(8000, 256, 128, 128, 32).check()


# ---------------------------------------------------------------- the embedded sounds

def test_sounds_are_deterministic_and_balanced():
  a, labels = sounds.load("train", 0, 48, 8000, 1.5)
  b, _ = sounds.load.__wrapped__("train", 0, 48, 8000, 1.5)
  np.testing.assert_array_equal(a, b)
  other, _ = sounds.load.__wrapped__("train", 1, 48, 8000, 1.5)
  assert not np.array_equal(a, other)
  assert sounds.NUM_CLASSES >= 10 and a.shape == (48, 12_000) and a.dtype == np.int16
  assert (np.bincount(labels) == 48 // sounds.NUM_CLASSES).all()
  assert (np.abs(a).max(axis=1) > 1000).all()  # every clip is audible
