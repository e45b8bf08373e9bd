"""SigLIP import parity: a tiny random Hugging Face SiglipModel (tests/fixtures/siglip, made by
its make_siglip_fixtures.py with torch) gives the same logits through our two-tower family, with
no torch here; a checkpoint that is not SigLIP's shape is a one-line error."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from foundation import hf as hf_lib
from foundation import interop_siglip
from foundation import step as step_lib

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "siglip", "tiny")
# Measured: 2.55e-07 (logits), 1.2e-07 / 8.9e-08 (image / text embeddings, absolute): float32
# round-off.
MAX_RELATIVE_LOGIT_ERROR = 1e-5


def relative_error(got, want) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_siglip_import_matches_the_transformers_logits():
  config, params, _ = interop_siglip.load(FIXTURE)
  golden = np.load(os.path.join(FIXTURE, "golden.npz"))
  model = step_lib.make_model(config)
  ids = golden["input_ids"]
  # SigLIP pads every text to its full length and attends over it all: every column is "real".
  image, text, scale, bias = jax.jit(model.apply)({"params": params}, golden["pixels"], ids,
                                                  np.ones_like(ids))
  logits = np.asarray(image @ text.T * scale + bias)
  error = relative_error(logits, golden["logits"])
  print(f"siglip: max relative logit error {error:.2e}")
  assert error < MAX_RELATIVE_LOGIT_ERROR
  np.testing.assert_allclose(np.asarray(image), golden["image_embeds"], atol=1e-6)
  np.testing.assert_allclose(np.asarray(text), golden["text_embeds"], atol=1e-6)
  assert config.model.text.arch == "siglip" and not config.model.image_proj
  assert config.data.text_len == 16 and config.data.image_size == 16


def test_checkpoints_that_are_not_siglip_are_one_line_errors(tmp_path):
  hf = hf_lib.read_json(os.path.join(FIXTURE, "config.json"))
  with pytest.raises(hf_lib.UnsupportedModelError, match="model_type='clip'"):
    interop_siglip.model_fields({**hf, "model_type": "clip"})
  wide = {**hf, "vision_config": {**hf["vision_config"], "hidden_size": 48}}
  with pytest.raises(hf_lib.UnsupportedModelError,
                     match="vision_config.hidden_size=48 does not match text_config"):
    interop_siglip.model_fields(wide)
  # Weights that disagree with their config.json: the param, both shapes.
  folder = tmp_path / "deeper"
  shutil.copytree(FIXTURE, folder)
  (folder / "config.json").write_text(json.dumps(
      {**hf, "text_config": {**hf["text_config"], "intermediate_size": 48}}))
  with pytest.raises(hf_lib.WeightShapeError, match=r"param \['text'\]\['layers'\]\['mlp'\]"
                                                    r"\['wi'\]\['bias'\]: the checkpoint gives "
                                                    r"shape \(2, 64\), the config.json's sizes "
                                                    r"need \(2, 48\)"):
    interop_siglip.load(str(folder))
