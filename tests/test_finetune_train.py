"""Fine-tuning through the trainer: SFT from a pre-trained checkpoint beats the same budget from
scratch; LoRA trains only its adapters (the base stays bit-identical); a classification head learns
a labelled CSV."""

import csv
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune as finetune_configs
from configs import lm
from foundation import train
from foundation.data import sft

PRETRAIN_STEPS, SFT_STEPS = 60, 30


def set_fields(config, **changes):
  with config.unlocked():
    for dotted, value in changes.items():
      node, *path = [config] + dotted.split(".")
      for part in path[:-1]:
        node = node[part]
      node[path[-1]] = value
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """The laptop demo (size=tiny, the embedded Python sources), shortened."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = set_fields(lm.get_config("size=tiny"), **{
      "steps": PRETRAIN_STEPS, "optim.warmup_steps": 10, "eval.every": 0,
      "checkpoint.every": PRETRAIN_STEPS, "log.every": 20, "log.generate_tokens": 0})
  train.train(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("sft") / "functions.jsonl"
  with open(path, "w") as f:
    for record in sft.python_function_records(300, seed=0):
      f.write(json.dumps(record) + "\n")
  return str(path)


def sft_config(chat_file, init_from, lora=False):
  config = finetune_configs.get_config("task=sft,base=tiny" + (",lora" if lora else ""))
  return set_fields(config, **{
      "steps": SFT_STEPS, "init_from": init_from, "sft.train_path": chat_file,
      "optim.warmup_steps": 5, "eval.every": SFT_STEPS, "eval.steps": 4,
      "checkpoint.every": SFT_STEPS, "log.every": 10})


def test_sft_from_the_pretrained_checkpoint_beats_training_from_scratch(
    pretrained, chat_file, tmp_path):
  tuned = train.train(sft_config(chat_file, pretrained), str(tmp_path / "tuned"))["eval"]
  scratch = train.train(sft_config(chat_file, ""), str(tmp_path / "scratch"))["eval"]
  print(f"SFT eval loss after {SFT_STEPS} steps: from the checkpoint {tuned['loss']:.3f}, "
        f"from scratch {scratch['loss']:.3f}")
  assert tuned["loss"] < 0.85 * scratch["loss"], (tuned, scratch)


def read_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                          "state"))
  return state["params"]


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_lora_trains_only_the_adapters(pretrained, chat_file, tmp_path, capsys):
  workdir = str(tmp_path / "lora")
  train.train(set_fields(sft_config(chat_file, pretrained, lora=True),
                         **{"steps": 10, "eval.every": 0, "checkpoint.every": 10}), workdir)
  out = capsys.readouterr().out
  assert "trainable: " in out and "Adam state" in out
  base = flat(read_params(pretrained, PRETRAIN_STEPS))
  tuned = flat(read_params(workdir, 10))
  adapters = [k for k in tuned if "lora_" in k]
  assert adapters and set(tuned) - set(adapters) == set(base)
  for key, value in base.items():  # every base param bit-identical after 10 LoRA steps
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)
  assert any(np.abs(tuned[k]).max() > 0 for k in adapters if k.endswith("lora_b"))

  # Exported to Hugging Face safetensors, the adapters are merged into the kernels: imported
  # back as a plain model (no adapters), it computes the adapted model's logits.
  from foundation import generate, hf  # pylint: disable=g-import-not-at-top
  hf.export_checkpoint(workdir, str(tmp_path / "hf"))
  merged = hf.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "merged"), dtype="float32",
                                params_only=True)
  adapted, plain = generate.load(workdir), generate.load(merged)
  base_model = generate.load(pretrained)
  # generate.load folds a LoRA run's adapters in (lora.model_params): no adapter leaf is left.
  assert adapted.config.lora.rank == 8 and plain.config.lora.rank == 0
  assert not [k for k in flat(adapted.params) | flat(plain.params) if "lora_" in k]
  tokens = np.arange(3, 67, dtype=np.int32)[None]
  batch = (tokens, np.arange(64, dtype=np.int32)[None], np.ones_like(tokens))
  logits = np.asarray(adapted.model.apply({"params": adapted.params}, *batch))
  np.testing.assert_allclose(np.asarray(plain.model.apply({"params": plain.params}, *batch)),
                             logits, rtol=1e-5, atol=1e-5)
  # ... and the adapters did change the model: not the base's logits.
  base_logits = np.asarray(base_model.model.apply({"params": base_model.params}, *batch))
  assert np.abs(logits - base_logits).max() > 1e-3


def test_a_classification_head_learns_a_labelled_csv(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "reviews.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for _ in range(400):
      label = rng.choice(["neg", "pos"])
      words = rng.choice(["bad", "awful", "dull"] if label == "neg" else ["good", "great", "fun"],
                         size=3)
      filler = rng.choice(["the", "film", "was", "plot", "and", "a"], size=5)
      writer.writerow([" ".join(rng.permutation(np.concatenate([words, filler]))), label])
  config = finetune_configs.get_config("task=classify,base=test")
  config = set_fields(config, **{
      "steps": 40, "seq_len": 64, "optim.lr": 3e-3, "optim.warmup_steps": 5,
      "classify.train_path": str(path), "eval.every": 40, "eval.steps": 4,
      "checkpoint.every": 40, "log.every": 10})
  result = train.train(config, str(tmp_path / "cls"))
  assert result["eval"]["accuracy"] >= 0.9, result["eval"]


def test_lora_sft_of_an_imported_hugging_face_model_with_its_tokenizer_json(
    pretrained, tmp_path, capsys):
  """Our checkpoint exported to HF safetensors with a tokenizer.json, imported back, then
  fine-tuned with `base=` the imported workdir: the model, seq_len and tokenizer come from it,
  the chat records are read with the tokenizer.json, and the base stays bit-identical."""
  from foundation import hf  # pylint: disable=g-import-not-at-top
  from test_tokenizer_json import write_tokenizer_json  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / "hf"
  hf.export_checkpoint(pretrained, str(hf_dir))
  records = sft.python_function_records(100, seed=1)
  write_tokenizer_json(hf_dir, [r["prompt"] + r["response"] for r in records])
  imported = hf.import_checkpoint(str(hf_dir), str(tmp_path / "imported"), dtype="float32")
  chat_file = tmp_path / "chat.jsonl"
  chat_file.write_text("".join(json.dumps(r) + "\n" for r in records))
  config = finetune_configs.get_config(f"task=sft,base={imported},lora,quick")
  assert config.init_from == imported and config.data.tokenizer.endswith("imported/tokenizer.json")
  workdir = str(tmp_path / "tuned")
  train.train(set_fields(config, **{"steps": 3, "sft.train_path": str(chat_file), "eval.every": 0,
                                    "checkpoint.every": 3, "log.every": 1}), workdir)
  out = capsys.readouterr().out
  assert f"started from the params of {imported}" in out and "hf tokenizer (300 ids" in out
  base, tuned = flat(read_params(pretrained, PRETRAIN_STEPS)), flat(read_params(workdir, 3))
  assert set(tuned) - {k for k in tuned if "lora_" in k} == set(base)
  for key, value in base.items():  # through export, import and 3 LoRA steps: unchanged
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)
  # The fine-tuned workdir is one generate (and evaluate, export) can load.
  from foundation import generate  # pylint: disable=g-import-not-at-top
  session = generate.load(workdir)
  assert session.config.lora.rank == 8 and session.tokenizer.eos_id == 2
  with pytest.raises(ValueError, match=r"base='nowhere' is neither a configs/lm.py size"):
    finetune_configs.get_config("task=sft,base=nowhere")
