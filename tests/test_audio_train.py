"""The audio family through the generic core: masked pre-training resumes bit-identically (the
patch noise and crops come from the saved input position), a sharded step equals the one-device
step, a frozen encoder (the linear probe) keeps its bits, and bad audio input is a one-line error
naming the file or field. That the MAE's encoder loads into a classifier is test_audio_model's
(the same names and shapes) and the benchmark's (benchmarks/audio_transfer.py); init_from itself
is tests/test_vit_train.py's."""

import functools
import os

import jax
import numpy as np
import pytest

from configs import audio as audio_configs
from foundation import build as build_lib
from foundation import mesh as mesh_lib
from foundation import registry
from foundation.data import audio_input
from foundation.data import sounds
from tests.test_vit_train import _records, _train

SMALL = ("--config.data.num_train=192", "--config.data.num_eval=64")


def _audio(workdir, *extra, config="configs/audio.py:size=test,preset=mae"):
  return _train(workdir, *SMALL, *extra, config=config)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A masked pre-training run of 40 steps (checkpoints every 20)."""
  workdir = tmp_path_factory.mktemp("audio") / "mae"
  result = _audio(workdir, "--config.steps=40")
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir, result.stdout


def test_masked_pretraining_resumes_bit_identically(pretrained, tmp_path):
  workdir, stdout = pretrained
  assert "audio model, task audio_mae" in stdout
  evals = _records(workdir, "eval")
  assert evals[40]["loss"] < evals[0]["loss"] - 0.3, evals  # the reconstruction loss falls
  part = tmp_path / "part"
  assert _audio(part, "--config.steps=20").returncode == 0
  resumed = _audio(part, "--config.steps=40")
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from the checkpoint at step 20" in resumed.stdout
  whole, parts = _records(workdir, "train"), _records(part, "train")
  steps = [s for s in whole if s > 20]
  assert steps and all(parts[s]["loss"] == whole[s]["loss"] for s in steps)
  assert _records(part, "eval")[40] == evals[40]


# ---------------------------------------------------------------- sharding (in process)

def make_config(preset="mae", arch="patch", **mesh):
  config = audio_configs.get_config(f"size=test,preset={preset},arch={arch}")
  with config.unlocked():
    config.optim.warmup_steps = 0
    config.optim.eps = 1e-3  # the update follows the gradient (see tests/test_sharding.py)
    config.batch_size = 16
    config.data.num_train = 64
    for axis in mesh_lib.AXES:
      config.mesh[axis] = mesh.get(axis, 1)
  return config


def steps(config, devices, count=2):
  """Init and `count` train steps; returns (last loss, params before, params after)."""
  built = build_lib.build(config, devices)
  state = built.init_state()
  initial = jax.device_get(state["params"])
  train_step, _ = built.jit_steps()
  task = registry.get("task", config.task)(config)
  noise = task.patches() if config.task == "audio_mae" else 0
  batches = audio_input.make_train_iterator(config, 0, 1, noise)
  with built.context():
    for _ in range(count):
      state, metrics = train_step(state, built.global_batch(next(batches)))
  return float(metrics["loss"]), initial, jax.device_get(state["params"])


@functools.cache
def reference(preset, arch):
  return steps(make_config(preset, arch), jax.devices()[:1])


# One case: each costs two compiles (the MAE: the patch noise key, the encoder's gather of the
# visible patches and the decoder's scatter back); the conv stem's shapes are test_audio_model's.
@pytest.mark.parametrize("preset, arch, mesh", [("mae", "patch", dict(data=2, fsdp=2, tensor=2))],
                         ids=["mae-data2-fsdp2-tensor2"])
def test_a_sharded_step_equals_the_one_device_step(preset, arch, mesh):
  ref_loss, initial, ref_params = reference(preset, arch)
  loss, _, params = steps(make_config(preset, arch, **mesh), jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  moved = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, initial))[0]
  # every param moved (so equality is not vacuous) but the key bias (softmax-invariant)
  assert all(m > 1e-6 for path, m in moved if "['k']['bias']" not in jax.tree_util.keystr(path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               params, ref_params)


def test_a_frozen_encoder_keeps_its_bits():
  config = make_config("probe", data=8)
  _, initial, params = steps(config, jax.devices(), count=3)
  assert np.abs(params["head"]["kernel"] - initial["head"]["kernel"]).max() > 0
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], initial["encoder"])


# ---------------------------------------------------------------- bad input

def _folder(root, clips: dict[str, list[bytes]]):
  for name, files in clips.items():
    os.makedirs(root / name, exist_ok=True)
    for i, data in enumerate(files):
      (root / name / f"{i}.wav").write_bytes(data)
  return root


def _clip(seconds=1.2, rate=8000, hz=440.0):
  return sounds.wav_bytes(np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate), rate)


def test_a_folder_of_wav_files_makes_batches(tmp_path):
  """files:DIR with one folder per class of WAV files (the bad ones: the test below)."""
  good = _folder(tmp_path / "good", {"low": [_clip(hz=200 + 10 * i) for i in range(6)],
                                     "high": [_clip(hz=2000 + 10 * i) for i in range(6)]})
  config = make_config("supervised")
  with config.unlocked():
    config.data.source = f"files:{good}"
    config.data.eval_fraction = 0.3
    config.model.num_classes = 2
  batch = next(audio_input.make_train_iterator(config, 0, 1))
  assert batch["spectrogram"].shape == (16, 64, 32) and set(batch["label"]) == {0, 1}
  assert audio_input.class_names(config) == ("high", "low")


@pytest.mark.parametrize("case, message", [
    ("undecodable", "b/0.wav is not a PCM WAV file"),
    ("rate", "b/0.wav has sample rate 16000 Hz but data.sample_rate=8000 and "
             "data.resample=False"),
    ("short", "b/0.wav is 0.500 s long, shorter than data.clip_seconds=1.024"),
    ("classes", "has 3 classes but model.num_classes=2"),
    ("flac", "b/0.flac: FLAC needs a decoder"),
    ("tfds", "data.source='tfds:speech_commands': the dataset is not prepared in "
             "data.tfds_data_dir="),
])
def test_bad_audio_input_is_a_one_line_error(tmp_path, case, message):
  clips = {"a": [_clip()], "b": [_clip()]}
  if case == "undecodable":
    clips["b"] = [b"RIFF....not audio"]
  if case == "rate":
    clips["b"] = [_clip(rate=16000)]
  if case == "short":
    clips["b"] = [_clip(seconds=0.5)]
  if case == "classes":
    clips["c"] = [_clip()]
  root = _folder(tmp_path / "data", clips)
  if case == "flac":
    os.rename(root / "b" / "0.wav", root / "b" / "0.flac")
  config = make_config("supervised")
  with config.unlocked():
    config.data.source = "tfds:speech_commands" if case == "tfds" else f"files:{root}"
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.data.resample = case != "rate"
    config.data.eval_fraction = 0.0
    config.model.num_classes = 2
  with pytest.raises(ValueError) as error:
    audio_input.make_train_iterator(config, 0, 1)
  text = str(error.value)
  assert message in text and "\n" not in text, text
  # the trainer prints such a ValueError as one 'config error: ...' line (tests/test_vit_train.py)
