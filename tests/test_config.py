"""Bad configs stop before any compile, with a message that names the field and the numbers."""

import os
import subprocess
import sys

import jax
import pytest

from configs import lm
from foundation import config as config_lib
from foundation import mesh as mesh_lib
from foundation import optim
from foundation import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**changes):
  config = lm.get_config("size=test")
  with config.unlocked():
    for dotted, value in changes.items():
      *parents, leaf = dotted.split("__")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def validation_error(config, devices=None) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, devices or jax.devices(), 1)
  return str(e.value)


def run_train(*args, timeout=120):
  return subprocess.run(
      [sys.executable, "-m", "foundation.train", "--config", "configs/lm.py:size=test",
       "--workdir", "/nonexistent/never-written", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_size_is_a_valid_locked_config():
  for size in lm.SIZES:
    config = lm.get_config(f"size={size}")
    config_lib.check_values(config)
    with pytest.raises(AttributeError):
      config.model.n_layer = 3  # locked: a typo is an error, not a new field


def test_a_classifier_fine_tune_of_every_size_is_valid():
  # Sizes from 1b up default to gradient accumulation, which the classifier step refuses.
  from configs import finetune
  for size in lm.SIZES:
    config_lib.check_values(finetune.get_config(f"task=classify,base={size}"))


def test_quick_mode_shortens_the_run():
  assert lm.get_config("size=tiny,quick").steps < lm.get_config("size=tiny").steps


def test_unknown_size_or_argument():
  with pytest.raises(ValueError, match="size='huge' is unknown; sizes: test, tiny"):
    lm.get_config("size=huge")
  with pytest.raises(ValueError, match="argument 'sise' is unknown"):
    lm.get_config("sise=tiny")


def test_misspelt_key_on_the_command_line():
  result = run_train("--config.model.n_layer=3")
  assert result.returncode != 0
  assert "config error: --config.model.n_layer=3: 'model.n_layer' is not a config field" in (
      result.stderr)
  assert "did you mean 'model.n_layers'" in result.stderr
  assert "Traceback" not in result.stderr


def test_wrong_type_on_the_command_line():
  result = run_train("--config.steps=1.5")
  assert result.returncode != 0
  assert "config error: flag --config.steps=1.5" in result.stderr
  assert "Traceback" not in result.stderr


def test_mesh_product_must_match_the_devices():
  message = validation_error(make_config(mesh__data=3, mesh__fsdp=1))
  assert ("mesh.data=3 * mesh.fsdp=1 * mesh.sequence=1 * mesh.tensor=1 = 3, but there are 8 "
          "devices") in message


def test_only_one_mesh_axis_may_fill():
  message = validation_error(make_config(mesh__data=-1, mesh__fsdp=-1))
  assert "only one degree may be -1, got -1 for mesh.data, mesh.fsdp" in message


def test_mesh_fill_must_divide():
  message = validation_error(make_config(mesh__data=3, mesh__fsdp=-1))
  assert "cannot fill 8 devices: 8 is not divisible by 3" in message


def test_batch_must_split_over_data_parallel_degree():
  message = validation_error(make_config(batch_size=12, mesh__data=8, mesh__fsdp=1))
  assert ("batch_size=12 is not divisible by the data-parallel degree 8 (mesh.data=8 * "
          "mesh.fsdp=1)") in message


def test_heads_must_divide_by_kv_heads():
  message = validation_error(make_config(model__n_heads=4, model__n_kv_heads=3))
  assert "model.n_heads=4 is not divisible by model.n_kv_heads=3" in message


def test_sequence_longer_than_the_model_allows():
  message = validation_error(make_config(seq_len=256))
  assert "seq_len=256 is longer than the model allows: model.max_seq_len=128" in message


def test_unknown_choice():
  message = validation_error(make_config(model__remat_policy="some"))
  assert "model.remat_policy='some' is not one of ('none', 'minimal', 'dots', 'full')" in message


def test_tensor_degree_must_divide_kv_heads():
  message = validation_error(make_config(mesh__tensor=4, mesh__fsdp=2))
  assert ("model.n_kv_heads=2 cannot be split 4 ways over mesh.tensor=4 (logical axis 'kv_heads')"
          in message)


def test_tensor_degree_must_divide_the_mlp_width():
  message = validation_error(make_config(model__mlp_dim=100, mesh__tensor=8, mesh__fsdp=1,
                                         model__n_heads=8, model__n_kv_heads=8, model__head_dim=8))
  assert "model.mlp_dim=100 cannot be split 8 ways over mesh.tensor=8 (logical axis 'mlp')" in (
      message)


def test_sequence_split_must_divide_the_sequence_length():
  message = validation_error(make_config(seq_len=36, mesh__sequence=8, mesh__fsdp=1))
  assert "seq_len=36 cannot be split 8 ways over mesh.sequence=8 (logical axis 'length')" in message


def test_param_split_is_checked_again_on_the_real_shapes():
  # A custom rule can split a dimension no field check knows about: the abstract params catch it.
  config = make_config(mesh__tensor=4, mesh__fsdp=2)
  with config.unlocked():
    config.mesh.rules = tuple((n, a) for n, a in config.mesh.rules if n != "kv_heads") + (
        ("kv_heads", "tensor"),)
    config.model.n_kv_heads = 2
  mesh = mesh_lib.make_mesh(config.mesh)
  with pytest.raises(config_lib.ConfigError, match=r"param layers/attn/k/kernel of shape "
                     r"\(2, 64, 2, 16\) cannot be split: its dimension 2 is not divisible by mesh "
                     r"axes \('tensor',\) = 4 ways"):
    step_lib.state_shardings(step_lib.make_model(config), optim.make_optimizer(config), config,
                             mesh)


def test_tokenizer_larger_than_the_vocabulary():
  from foundation import data
  with pytest.raises(ValueError, match="the tokenizer data.tokenizer='byte' has vocab_size 259, "
                     "more than model.vocab_size=256"):
    data.check_vocab_size(data.make_tokenizer("byte"), make_config(model__vocab_size=256))
