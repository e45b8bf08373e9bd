"""The two-tower family through the generic core: the drawn scenes, the contrastive losses over the
global batch (8 devices = 1 device, each sharding layout), resume bit-identical, the evaluators, and
bad input as one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import siglip as siglip_configs
from foundation import build as build_lib
from foundation import config as config_lib
from foundation import mesh as mesh_lib
from foundation.data import image_text_input
from foundation.data import scenes
from foundation.tasks import contrastive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the data

def test_scenes_are_deterministic_describe_themselves_and_hold_out_combinations():
  a, b = scenes.load("train", 0, 300), scenes.load("train", 1, 300)
  assert a.images.shape == (300, 32, 32, 3) and not np.array_equal(a.images, b.images)
  scenes.load.cache_clear()  # drawn again from the seed: the same pixels
  assert np.array_equal(scenes.load("train", 0, 300).images, a.images)
  train_combos = set(zip(a.shape.tolist(), a.colour.tolist()))
  held = scenes.load("heldout", 0, 200)
  assert train_combos.isdisjoint(scenes.HELD_OUT) and len(train_combos) == 25
  assert set(zip(held.shape.tolist(), held.colour.tolist())) == set(scenes.HELD_OUT)
  i = int(np.argmax(a.count == 2))
  words = a.caption(i).split()
  assert words[0] == "two" and words[1] == scenes.COLOUR_NAMES[a.colour[i]]
  assert words[-1] == scenes.POSITIONS[a.position[i]]
  answers = [answer for _, answer in a.questions(i)]
  assert answers == ["two", scenes.COLOUR_NAMES[a.colour[i]], scenes.SHAPES[a.shape[i]],
                     scenes.POSITIONS[a.position[i]]]
  # The shapes are drawn in the half the caption names: the painted pixels lie there.
  image = a.images[i].astype(np.float32)
  paint = np.abs(image - np.median(image.reshape(-1, 3), axis=0)).sum(-1) > 120
  left = paint[:, :16].sum() > paint[:, 16:].sum()
  assert left == (a.position[i] == 0)


def _config(**overrides):
  config = siglip_configs.get_config("size=test")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, last = key.split(".")
      for p in parents:
        node = node[p]
      node[last] = value
  return config


def test_a_jsonl_of_images_with_captions_or_questions(tmp_path):
  for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
    Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
  lines = [{"image": "0.png", "caption": "red"}, {"image": "1.png", "caption": "green"},
           {"image": "2.png", "question": "which colour?", "answer": "blue"},
           {"image": "3.png", "caption": "yellow"}]
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
  config = _config(**{"data.source": f"files:{tmp_path}/pairs.jsonl", "data.eval_fraction": 0.0,
                      "batch_size": 4})
  batch = next(image_text_input.make_train_iterator(config, 0, 1))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["text"].shape == (4, 48)
  texts = {bytes((row[1:seg.sum() - 1] - 3).tolist()).decode() for row, seg in
           zip(batch["text"], batch["text_segments"])}
  assert texts == {"red", "green", "which colour? blue", "yellow"}


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
  Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
  (tmp_path / "broken.png").write_bytes(b"not an image")
  (tmp_path / "missing.jsonl").write_text(
      '{"image": "ok.png", "caption": "a"}\n{"image": "gone.png", "caption": "b"}\n')
  (tmp_path / "broken.jsonl").write_text(
      '{"image": "ok.png", "caption": "a"}\n{"image": "broken.png", "caption": "b"}\n')
  for name, message in (("missing", "missing.jsonl:2: image 'gone.png' does not exist"),
                        ("broken", "broken.png is not a JPEG, PNG, GIF or BMP image")):
    config = _config(**{"data.source": f"files:{tmp_path}/{name}.jsonl",
                        "data.eval_fraction": 0.0})
    with pytest.raises(ValueError, match="^[^\n]*$") as e:
      image_text_input.make_train_iterator(config, 0, 1)
    assert message in str(e.value)
  # TFDS by name, not prepared here: one line naming the source and where it looked (offline).
  config = _config(**{"data.source": "tfds:coco_captions", "data.tfds_data_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="^data.source='tfds:coco_captions': [^\n]*$"):
    image_text_input.make_train_iterator(config, 0, 1)


@pytest.mark.parametrize("overrides, message", [
    ({"model.text.width": 48, "model.text_proj": False},
     "model.text.width=48 does not match model.embed_dim=32: without a head "
     "(model.text_proj=False)"),
    ({"model.image_proj": False, "model.embed_dim": 48},
     "model.image.width=32 does not match model.embed_dim=48"),
    ({"grad_accum": 2}, "grad_accum=2: the siglip loss takes its negatives from the whole batch"),
    ({"data.text_len": 80}, "data.text_len=80 is longer than the text tower allows: "
                            "model.text.max_len=64"),
    ({"model.text.arch": "bert"}, "model.text.arch='bert' is unknown"),
])
def test_bad_configs_are_one_line_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_values(_config(**overrides))
  assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the loss over the global batch

def _small(**overrides):
  """The test size with one layer per tower: the equality needs the sharded program, not depth."""
  return _config(**{"batch_size": 16, "model.image.depth": 1, "model.text.depth": 1,
                    **overrides})


def _losses(config, devices, batch):
  """(sigmoid sums, softmax sums) of the init params on one global batch, under jit with the
  mesh's shardings (each device holding its rows)."""
  built = build_lib.build(config, devices)
  params = built.init_state()["params"]
  tasks = [contrastive.SigmoidContrastive(config), contrastive.SoftmaxContrastive(config)]
  with built.context():
    out = jax.jit(lambda p, b: [t.loss_sums(built.model, p, b) for t in tasks])(
        params, built.global_batch(batch))
  return jax.device_get(out)


@pytest.fixture(scope="module")
def one_device_reference():
  """16 drawn scenes with their captions (pixels scaled as value_range(-1,1); numpy only), three
  of them padding rows, and their losses on one device."""
  from foundation.data import tokenizers  # pylint: disable=g-import-not-at-top
  drawn = scenes.load("train", 0, 16)
  ids, segments = image_text_input.tokenize(drawn.captions(), tokenizers.ByteTokenizer(), 48)
  mask = np.ones(16, np.int32)
  mask[-3:] = 0  # padding rows: neither rows nor negatives
  batch = {"image": drawn.images.astype(np.float32) / 127.5 - 1, "text": ids,
           "text_segments": segments * mask[:, None], "label_mask": mask}
  return batch, _losses(_small(), jax.devices()[:1], batch)


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1), dict(fsdp=8),
                                  dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_the_contrastive_losses_on_8_devices_equal_one_device(one_device_reference, mesh):
  batch, (sigmoid, softmax) = one_device_reference
  config = _small(**{f"mesh.{a}": mesh.get(a, 1) for a in mesh_lib.AXES})
  got_sigmoid, got_softmax = _losses(config, jax.devices(), batch)
  for got, want in ((got_sigmoid, sigmoid), (got_softmax, softmax)):
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=2e-6)
    assert got["correct"] == want["correct"]
  assert sigmoid["loss_sum"] > 0 and softmax["loss_sum"] > 0


def test_padding_rows_are_no_negatives():
  """The losses of 13 rows padded to 16 equal those of the 13 rows alone."""
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((2, 16, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  logits = contrastive.pair_logits(emb[0], emb[1], 10.0, -5.0)
  positive, valid = np.eye(16, dtype=bool), np.arange(16) < 13
  for loss in (contrastive.sigmoid_loss_sum, contrastive.softmax_loss_sum):
    np.testing.assert_allclose(loss(logits, positive, valid),
                               loss(logits[:13, :13], positive[:13, :13], valid[:13]), rtol=1e-6)


# ---------------------------------------------------------------- the trainer: resume, evaluators

def _train(workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "foundation.train", "--config", "configs/siglip.py:size=test",
       "--workdir", str(workdir), "--config.steps=20", "--config.optim.decay_steps=20",
       "--config.checkpoint.every=10", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})


def _records(workdir, split):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  return {l["step"]: l for l in lines if l.get("split") == split}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("siglip") / "run"
  result = _train(workdir, "--config.evaluate.every=20")
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir, result.stdout


def test_the_trainer_runs_the_family_and_its_evaluators(uninterrupted):
  workdir, stdout = uninterrupted
  assert "two_tower model, task siglip" in stdout
  tasks = _records(workdir, "tasks")
  assert set(tasks) == {0, 20}
  for key in ("zeroshot/accuracy", "zeroshot/shape_accuracy", "retrieval/image_to_text_recall@1",
              "retrieval/text_to_image_recall@5"):
    assert 0.0 <= tasks[20][key] <= 1.0, key
  assert tasks[20]["zeroshot/examples"] == 200 and tasks[20]["zeroshot/chance"] == 1 / 30
  evals = _records(workdir, "eval")
  assert evals[20]["loss"] < evals[0]["loss"]


def test_resume_is_bit_identical(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  part = tmp_path / "part"
  assert _train(part, "--config.steps=10").returncode == 0
  resumed = _train(part)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from the checkpoint at step 10" in resumed.stdout
  whole, parts = _records(workdir, "train"), _records(part, "train")
  steps = [s for s in whole if s > 10]
  assert steps and all(parts[s]["loss"] == whole[s]["loss"] for s in steps)
  assert all(parts[s]["grad_norm"] == whole[s]["grad_norm"] for s in steps)
  assert _records(part, "eval")[20] == _records(workdir, "eval")[20]


def test_a_caption_file_naming_a_missing_image_stops_the_trainer_in_one_line(tmp_path):
  (tmp_path / "pairs.jsonl").write_text('{"image": "nowhere.png", "caption": "a cat"}\n')
  result = _train(tmp_path / "bad", f"--config.data.source=files:{tmp_path}/pairs.jsonl",
                  "--config.data.eval_fraction=0")
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert last == (f"config error: {tmp_path}/pairs.jsonl:1: image 'nowhere.png' does not exist "
                  f"(looked for {tmp_path}/nowhere.png)")


def test_the_text_towers_attention_is_bidirectional_and_the_decoders_stays_causal():
  from foundation.models import layers  # pylint: disable=g-import-not-at-top
  segments = np.array([[1, 1, 1, 0]])
  encoder = np.asarray(layers.attention_mask(segments, causal=False))[0, 0]
  decoder = np.asarray(layers.attention_mask(segments))[0, 0]
  assert encoder[0, 2] and not decoder[0, 2]           # the first token sees the last real one
  assert not encoder[0, 3] and not encoder[3, 3]       # never padding
  np.testing.assert_array_equal(decoder[:3, :3], np.tril(np.ones((3, 3), bool)))
