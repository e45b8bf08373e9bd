"""The image-conditioned LM (the vlm family, task vlm): the prefix-LM mask, the loss on the text
only, decoding with the image prefix, a sharded step equal to one device's, resume bit-identical
through `python -m foundation.train`, `generate --image`, initialisation from pre-trained
workdirs, and the prompt template's one-line error."""

import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vlm as vlm_configs
from foundation import build as build_lib
from foundation import config as config_lib
from foundation import generate
from foundation import mesh as mesh_lib
from foundation import registry
from foundation.data import tokenizers
from foundation.models import layers
from foundation.models import transformer
from foundation.models import vlm
from foundation.tasks import vlm as vlm_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**mesh):
  config = vlm_configs.get_config("size=test").unlock()
  config.optim.warmup_steps = 0
  config.optim.eps = 1e-3  # the update follows the gradient (see tests/test_sharding.py)
  config.batch_size = 8
  for axis in mesh_lib.AXES:
    config.mesh[axis] = mesh.get(axis, 1)
  return config


# ---------------------------------------------------------------- the mask

def test_the_prefix_mask_is_full_on_the_image_and_causal_on_the_text():
  segments = jnp.array([[1, 1, 1, 1, 1, 0]])  # 3 image tokens, 2 text tokens, 1 padding
  mask = np.asarray(layers.attention_mask(segments, prefix_len=3))[0, 0]
  expected = np.array([[1, 1, 1, 0, 0, 0],    # image tokens see every image token...
                       [1, 1, 1, 0, 0, 0],    # ... and no text
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],    # text: the whole prefix, then causal
                       [1, 1, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0]], bool)  # padding sees and is seen by nothing
  np.testing.assert_array_equal(mask, expected)
  # Off by default: the plain causal mask.
  real = np.arange(6) < 5
  np.testing.assert_array_equal(np.asarray(layers.attention_mask(segments))[0, 0],
                                np.tril(np.ones((6, 6), bool)) & real & real[:, None])
  # The cache's rule, prefilling the 6 slots at once, is the same.
  cached = layers.cached_attention_mask(segments, segments, jnp.int32(0), prefix_len=3)
  np.testing.assert_array_equal(np.asarray(cached)[0, 0], expected)


@functools.cache
def small_model():
  config = make_config()
  model = vlm.make(config)
  t = int(config.data.text_len)
  image = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  tokens = jax.random.randint(jax.random.key(2), (2, t), 3, 200)
  positions = jnp.broadcast_to(jnp.arange(t), (2, t))
  segments = jnp.ones((2, t), jnp.int32)
  params = jax.jit(lambda rng: nn.unbox(model.init(rng, tokens, positions, segments, None,
                                                    image)))(jax.random.key(0))
  return config, model, params["params"], (tokens, positions, segments, image)


@functools.cache
def forward():
  """The training forward of small_model, jitted once: (tokens, image) -> text logits."""
  _, model, params, (_, positions, segments, _) = small_model()
  return jax.jit(lambda t, i: model.apply({"params": params}, t, positions, segments, None, i))


def test_the_text_is_causal_and_sees_the_image():
  _, model, params, (tokens, positions, segments, image) = small_model()
  apply = forward()
  logits = apply(tokens, image)
  assert logits.shape == (*tokens.shape, model.cfg.decoder.vocab_size)  # text columns only
  later = tokens.at[:, 10:].set(7)
  np.testing.assert_allclose(apply(later, image)[:, :10], logits[:, :10], atol=1e-5)
  assert np.abs(np.asarray(apply(later, image)[:, 10:] - logits[:, 10:])).max() > 1e-3
  # Every text position depends on the image, the first one included.
  other = apply(tokens, image.at[:, :8, :8].set(0.0))  # the top-left patch only
  assert np.abs(np.asarray(other - logits)).max(axis=(0, 2)).min() > 1e-5


def test_the_cached_prefill_equals_the_whole_forward():
  """generate's prefill (image prefix into slots 0..P-1, then the prompt) gives the logits the
  training forward gives at the prompt's last token: positions and the prefix mask agree."""
  _, model, params, (tokens, positions, segments, image) = small_model()
  n = 9
  logits = forward()(tokens, image)
  full = logits[:, n - 1]
  cache = transformer.init_cache(model.cfg.decoder, 2, model.cfg.num_image_tokens + n)
  prefill, _ = model.apply({"params": params}, tokens[:, :n], positions[:, :n], segments[:, :n],
                           cache=cache, image=image)
  np.testing.assert_allclose(prefill[:, -1], full, atol=1e-4, rtol=1e-4)
  # And the decoding loop continues what the forward predicts (greedy, left-padded prompts).
  prompts = [list(map(int, tokens[0, :n])), list(map(int, tokens[1, :5]))]
  out = generate.generate(model, params, prompts, max_new_tokens=1, max_len=40,
                          images=np.asarray(image))
  assert out[0] == [int(jnp.argmax(full[0]))]
  assert out[1] == [int(jnp.argmax(logits[1, 4]))]


# ---------------------------------------------------------------- the loss

def test_the_loss_is_on_the_answer_only():
  tokenizer = tokenizers.make_tokenizer("byte")
  row = vlm_task.encode_row(tokenizer, "question: what colour is it? answer:", "red", 48)
  inputs, targets, loss_mask, segments = row
  answer = tokenizer.encode(" red") + [tokenizer.eos_id]
  assert list(targets[loss_mask == 1]) == answer
  assert segments.sum() == len(tokenizer.encode("question: what colour is it? answer: red")) + 1
  config, model, params, (tokens, positions, segments_, image) = small_model()
  task = registry.get("task", "vlm")(config)
  batch = {"image": image, "inputs": jnp.asarray(np.stack([inputs] * 2)),
           "targets": jnp.asarray(np.stack([targets] * 2)),
           "loss_mask": jnp.asarray(np.stack([loss_mask] * 2)),
           "segment_ids": jnp.asarray(np.stack([segments] * 2))}
  loss = jax.jit(lambda b: task.loss_sums(model, params, b)["loss_sum"])
  assert float(task.count(batch)) == 2 * len(answer)
  # Targets outside the answer (the prompt's) change nothing; the answer's do.
  prompt_changed = {**batch, "targets": batch["targets"].at[:, :5].set(9)}
  assert float(loss(prompt_changed)) == float(loss(batch))
  answer_changed = {**batch, "targets": jnp.where(batch["loss_mask"] == 1, 9, batch["targets"])}
  assert float(loss(answer_changed)) != float(loss(batch))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("field, template", [
    ("qa_prompt", "question: {question} answer:"),
    ("caption_prompt", "caption: <image>"),
])
def test_a_template_without_the_image_placeholder_is_one_line(field, template):
  config = make_config()
  config.data[field] = template
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, jax.devices()[:1], 1)
  message = str(e.value)
  assert f"data.{field}={template!r}" in message and "<image>" in message and "\n" not in message


# ---------------------------------------------------------------- sharding

def one_step(config, devices):
  """Init and two train steps; returns (second loss, params before, params after)."""
  built = build_lib.build(config, devices)
  state = built.init_state()
  initial = jax.device_get(state["params"])
  train_step, _ = built.jit_steps()
  batches, _ = registry.get("input", "vlm")(config, 0, 1, False)
  with built.context():
    for _ in range(2):
      state, metrics = train_step(state, built.global_batch(next(batches)))
  return float(metrics["loss"]), initial, jax.device_get(state["params"])


def test_a_sharded_step_equals_the_one_device_step():
  ref_loss, initial, ref_params = one_step(make_config(), jax.devices()[:1])
  loss, _, params = one_step(make_config(data=2, fsdp=2, tensor=2), jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  moved = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, initial))[0]
  # Every param moved (the key bias aside: q . b_k shifts a query's scores evenly).
  assert all(m > 1e-5 for path, m in moved if "['k']['bias']" not in jax.tree_util.keystr(path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               params, ref_params)


# ---------------------------------------------------------------- the trainer, resume, generate

def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})


def _records(workdir, split):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  return {l["step"]: l for l in lines if l.get("split") == split}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """12 steps of size=test through the trainer, checkpoints at 6 and 12, a loss every step."""
  workdir = tmp_path_factory.mktemp("vlm") / "run"
  result = _run("foundation.train", "--config", "configs/vlm.py:size=test", "--workdir",
                str(workdir), "--config.steps=12", "--config.checkpoint.every=6",
                "--config.log.every=1", "--config.eval.every=12",
                "--config.optim.decay_steps=40")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "vlm model, task vlm" in result.stdout
  return workdir


def test_resume_is_bit_identical(trained, tmp_path):
  part = tmp_path / "part"
  shutil.copytree(trained, part)
  shutil.rmtree(part / "checkpoints" / "12")  # as if killed after step 11: resume from 6
  result = _run("foundation.train", "--config", "configs/vlm.py:size=test", "--workdir",
                str(part), "--config.steps=12", "--config.checkpoint.every=6",
                "--config.log.every=1", "--config.eval.every=12",
                "--config.optim.decay_steps=40")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resumed from the checkpoint at step 6" in result.stdout
  whole, again = _records(trained, "train"), _records(part, "train")
  assert all(again[s]["loss"] == whole[s]["loss"] for s in range(7, 13))
  assert _records(part, "eval")[12] == _records(trained, "eval")[12]


def test_generate_reads_an_image(trained, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from foundation.data import scenes  # pylint: disable=g-import-not-at-top
  path = tmp_path / "scene.png"
  Image.fromarray(np.asarray(scenes.load("heldout", 0, 4).images[0])).save(path)
  prompt = "<image> question: what colour is the shape? answer:"
  result = _run("foundation.generate", "--workdir", str(trained), "--image", str(path),
                "--prompt", prompt, "--max_new_tokens", "4")
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.startswith(prompt)
  # Without the image the vlm's workdir says what it needs, in one line.
  result = _run("foundation.generate", "--workdir", str(trained), "--prompt", prompt)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode != 0 and len(errors) == 1 and "give --image FILE" in errors[0]


# ---------------------------------------------------------------- pre-trained towers

def _save_params(workdir, params):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": params})))
  manager.wait_until_finished()
  manager.close()


def test_init_from_a_vit_and_an_lm_workdir_either_frozen(tmp_path):
  """--config.init_from=image=VIT,decoder=LM (the core's PREFIX=WORKDIR pairs) puts a ViT
  workdir's params (its head ignored, its class token skipped) under image/ and an LM workdir's under decoder/; the
  projection starts fresh. With trainable='^projection/' both pre-trained parts stay frozen
  through a real train step: their bits equal the sources' afterwards."""
  from foundation import checkpoint  # pylint: disable=g-import-not-at-top
  from foundation import train as train_lib  # pylint: disable=g-import-not-at-top
  from foundation.models import vit  # pylint: disable=g-import-not-at-top
  config = make_config(data=-1)
  cfg = vlm.VLMConfig.from_config(config.model, 32)
  # A ViT classifier with a class token: its head is a known difference (ignored); its class
  # token, which this vlm's image tower (pool='mean') lacks, is not.
  vit_cfg = vit.ViTConfig.from_config({**config.model.image.to_dict(), "num_classes": 10,
                                       "pool": "cls"})
  vit_params = jax.jit(lambda rng: nn.unbox(vit.ViT(vit_cfg).init(
      rng, jnp.zeros((1, 32, 32, 3)))))(jax.random.key(5))["params"]
  lm_cfg = dataclasses_replace(cfg.decoder, prefix_len=0)
  lm_params = jax.jit(lambda rng: nn.unbox(transformer.Transformer(lm_cfg).init(
      rng, *(jnp.ones((1, 4), jnp.int32),) * 3)))(jax.random.key(6))["params"]
  _save_params(tmp_path / "vit", vit_params)
  _save_params(tmp_path / "lm", lm_params)
  # A two-tower run's checkpoint: its image tower is one group of its params.
  _save_params(tmp_path / "towers", {"image": vit_params, "text": lm_params})

  config.steps, config.checkpoint.every, config.eval.every = 1, 1, 0
  config.evaluate.every = 0
  config.init_from = f"image={tmp_path / 'vit'},decoder={tmp_path / 'lm'}"
  # Without the skip, the class token is named as the difference (one line, no traceback).
  with pytest.raises(config_lib.ConfigError, match=r"only in the checkpoint: cls\."):
    train_lib.train(config, str(tmp_path / "refused"))
  config.init_from = f"image={tmp_path / 'towers'}:picture,decoder={tmp_path / 'lm'}"
  with pytest.raises(config_lib.ConfigError, match=r"no group 'picture' \(there: image, text\)"):
    train_lib.train(config, str(tmp_path / "refused"))
  config.init_from = f"image={tmp_path / 'towers'}:image,decoder={tmp_path / 'lm'}"
  config.init_from_skip = "image/cls"
  config.trainable = "^projection/"
  train_lib.train(config, str(tmp_path / "run"))
  built = build_lib.build(config)
  after, _ = checkpoint.load_params(str(tmp_path / "run"), built.abstract_state["params"])
  expected_image = {k: v for k, v in vit_params.items() if k not in ("head", "cls")}
  jax.tree.map(np.testing.assert_array_equal, after["image"], expected_image)
  jax.tree.map(np.testing.assert_array_equal, after["decoder"], lm_params)
  assert set(after["projection"]) == {"kernel", "bias"}


@pytest.mark.parametrize("init_from, message", [
    ("picture=/nowhere", r"has no params group 'picture' \(its groups: decoder, image, projection\)"),
    ("image=/a,image=/b", r"'image' overlaps another prefix"),
    ("image=", r"needs both a prefix and a workdir"),
])
def test_bad_init_from_pairs_are_one_line(init_from, message, tmp_path):
  config = make_config(data=-1)
  config.init_from = init_from
  with pytest.raises(config_lib.ConfigError, match=message):
    from foundation import train as train_lib  # pylint: disable=g-import-not-at-top
    train_lib.train(config, str(tmp_path / "run"))


def dataclasses_replace(obj, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- a JSONL file of pairs

def _pairs_file(folder, records):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from foundation.data import scenes  # pylint: disable=g-import-not-at-top
  drawn = scenes.load("eval", 0, 4)
  for i in range(4):
    Image.fromarray(np.asarray(drawn.images[i])).save(folder / f"{i}.png")
  path = folder / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path, drawn


def test_a_jsonl_file_of_captions_and_questions_feeds_the_vlm(tmp_path):
  """data.source='files:PAIRS.jsonl': each record's caption and question/answer become rows of
  [image] + prompt + target, the image decoded from the file it names; the trainer runs on it."""
  records = [{"image": "0.png", "caption": "a shape"},
             {"image": "1.png", "question": "what is it?", "answer": "a square"},
             {"image": "2.png", "caption": "two shapes", "question": "how many?", "answer": "two"},
             {"image": "3.png", "caption": "nothing"}]
  path, drawn = _pairs_file(tmp_path, records)
  config = make_config(data=-1)
  config.data.source, config.data.eval_fraction = f"files:{path}", 0.0
  tokenizer = tokenizers.make_tokenizer("byte")
  train, _ = vlm_task.vlm_input(config, 0, 1, False)
  batch = next(iter(train))
  expected = {"caption: a shape": (0, "a shape"),
              "question: what is it? answer: a square": (1, "a square"),
              "caption: two shapes": (2, "two shapes"),
              "question: how many? answer: two": (2, "two"),
              "caption: nothing": (3, "nothing")}
  seen = set()
  for row in range(len(batch["inputs"])):
    n = int(batch["segment_ids"][row].sum())
    text = tokenizer.decode([int(t) for t in batch["inputs"][row][1:n]])  # after BOS
    target = tokenizer.decode([int(t) for t, m in zip(batch["targets"][row],
                                                      batch["loss_mask"][row])
                               if m and t != tokenizer.eos_id]).strip()
    image, answer = expected[text]
    assert target == answer  # the loss is on the target alone
    np.testing.assert_allclose(batch["image"][row],
                               np.asarray(drawn.images[image], np.float32) / 127.5 - 1, atol=1e-6)
    seen.add(text)
  assert seen == set(expected)
  config.steps, config.eval.every, config.checkpoint.every = 2, 0, 2
  config.evaluate.every = 0
  from foundation import train as train_lib  # pylint: disable=g-import-not-at-top
  result = train_lib.train(config, str(tmp_path / "run"))
  assert np.isfinite(result["train"]["loss"])


def test_a_jsonl_record_naming_a_missing_image_is_one_line(tmp_path):
  path, _ = _pairs_file(tmp_path, [{"image": "0.png", "caption": "a"},
                                   {"image": "gone.png", "caption": "b"}])
  config = make_config(data=-1)
  config.data.source, config.data.eval_fraction = f"files:{path}", 0.0
  with pytest.raises(ValueError, match=r"pairs.jsonl:2: image 'gone.png' does not exist"):
    vlm_task.vlm_input(config, 0, 1, False)
  config.data.text = "qa"  # records with captions only give no question rows
  path.write_text(json.dumps({"image": "0.png", "caption": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"pairs.jsonl:1: data.text='qa' needs 'question' and "
                                       r"'answer' \(the record has \['caption', 'image'\]\)"):
    vlm_task.vlm_input(config, 0, 1, False)


def test_the_evaluate_commands_limit_reaches_the_vlm_evaluator():
  """`python -m foundation.evaluate --tasks vlm_exact --limit N` scores N scenes, not the run
  config's evaluate.limit: a registered evaluator reads the evaluate settings asked for."""
  from foundation import defaults  # pylint: disable=g-import-not-at-top
  from foundation import evaluate  # pylint: disable=g-import-not-at-top
  config = make_config(data=-1)
  asked = defaults.evaluate_config()
  asked.update(tasks="vlm_exact:eval", limit=3)
  [evaluator] = evaluate.make_evaluators(config, vlm.make(config), None, None, asked)
  assert (evaluator.limit, evaluator.split) == (3, "eval")
  assert config.evaluate.limit == 200  # the run's own setting is left alone


def test_lm_size_gives_the_decoder_that_lms_shapes():
  """configs/vlm.py:...,lm=SIZE: the decoder has configs/lm.py SIZE's shapes, so that LM's
  workdir loads into decoder/ (init_from=decoder=WORKDIR); an unknown size is one line."""
  from configs import lm as lm_configs  # pylint: disable=g-import-not-at-top
  config = vlm_configs.get_config("size=test,lm=tiny")
  lm_model = lm_configs.get_config("size=tiny").model
  for field in vlm_configs.DECODER_SHAPE:
    assert config.model.decoder[field] == lm_model[field], field
  built = build_lib.build(config)
  lm_built = build_lib.build(lm_configs.get_config("size=tiny"))
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
  assert shapes(built.abstract_state["params"]["decoder"]) == shapes(
      lm_built.abstract_state["params"])
  with pytest.raises(ValueError, match=r"lm='huge' is unknown; configs/lm.py sizes: test, tiny"):
    vlm_configs.get_config("size=test,lm=huge")
