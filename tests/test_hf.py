"""Hugging Face interop: parity with transformers, exact export round trips, clear errors.

The golden fixtures (tests/fixtures/hf/, made by tests/fixtures/make_hf_fixtures.py) need no torch.
Where torch and transformers are installed, every parity test also runs `live` against freshly
made models, and the exported files are read back by transformers itself.
"""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation import data
from foundation import generate
from foundation import hf
from foundation import mesh as mesh_lib
from foundation import step as step_lib
from foundation.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
_spec = importlib.util.spec_from_file_location(
    "make_hf_fixtures", os.path.join(ROOT, "tests", "fixtures", "make_hf_fixtures.py"))
make_hf_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_hf_fixtures)

CASES = list(make_hf_fixtures.CASES)
# Each case on 8 devices; tensor parallelism wherever the kv heads split (Qwen2's one does not).
MESHES = {"qwen2_bias": dict(data=2, fsdp=4, tensor=1)}
DEFAULT_MESH = dict(data=2, fsdp=2, tensor=2)


def have_torch() -> bool:
  return all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


NO_TORCH = ("torch and transformers are not installed: the live comparison with freshly made HF "
            "models is skipped; the stored golden fixtures were compared")


@pytest.fixture(params=["fixture", "live"])
def variant(request):
  if request.param == "live" and not have_torch():
    pytest.skip(NO_TORCH)
  return request.param


def case(name: str, variant: str, tmp_path) -> tuple[str, dict]:
  """(HF checkpoint folder, golden arrays): the stored fixture, or a fresh model (another seed)."""
  if variant == "fixture":
    folder = os.path.join(FIXTURES, name)
    return folder, dict(np.load(os.path.join(folder, "golden.npz")))
  folder = str(tmp_path / name)
  return folder, make_hf_fixtures.make_case(name, folder, seed=1)


def imported(folder: str, name: str = "", scan_layers: bool = True):
  """(config, model, mesh, target, params): the checkpoint loaded into its training shardings."""
  config = hf.import_config(hf.read_json(os.path.join(folder, "config.json")), "test", "float32")
  with config.unlocked():
    config.mesh.update(MESHES.get(name, DEFAULT_MESH))
    config.model.scan_layers = scan_layers
  model = transformer.Transformer(transformer.ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)
  target = generate.abstract_params(model, config, mesh)
  return config, model, mesh, target, hf.load_params(folder, model.cfg, target)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens):
  """One compile per case, shared by its `fixture` and `live` variants."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens))


def logits_of(config, model, mesh, params, tokens):
  with step_lib.sharding_context(config, mesh):
    return np.asarray(forward(model, params, tokens))


def relative_error(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", CASES)
def test_parity_with_transformers(name, variant, tmp_path):
  """float32 logits within 1e-4 relative error, and the same greedy tokens (cached decoding)."""
  folder, golden = case(name, variant, tmp_path)
  config, model, mesh, target, params = imported(folder, name)
  assert all(a.sharding == t.sharding for a, t in
             zip(jax.tree.leaves(params), jax.tree.leaves(target)))
  logits = logits_of(config, model, mesh, params, golden["tokens"])
  error = relative_error(logits, golden["logits"])
  print(f"{name} ({variant}): max relative logit error {error:.2e}")
  assert error < 1e-4, error
  prompts = [[int(t) for t in row if t >= 0] for row in golden["prompts"]]
  greedy = generate.generate(model, params, prompts, max_new_tokens=golden["greedy"].shape[1],
                             max_len=model.cfg.max_seq_len, mesh=mesh,
                             axis_rules=mesh_lib.rules(config))
  np.testing.assert_array_equal(np.array(greedy), golden["greedy"])
  if variant == "live":  # transformers reads our export and computes the same logits
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    hf.export_params(params, model.cfg, str(tmp_path / "export"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "export"), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
      theirs = reloaded(torch.as_tensor(golden["tokens"], dtype=torch.long)).logits.numpy()
    assert relative_error(theirs, golden["logits"]) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_export_then_import_round_trips_exactly(name, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  folder = os.path.join(FIXTURES, name)
  _, model, _, target, params = imported(folder, name)
  out = str(tmp_path / "export")
  # A small shard limit for the Mistral case: several files and an index, as HF writes them.
  files = hf.export_params(params, model.cfg, out,
                           max_shard_bytes=40_000 if name == "mistral_window" else 4 << 30)
  assert (len(files) > 3) == (name == "mistral_window")
  again = hf.load_params(out, model.cfg, target)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The files hold the original tensors bit for bit, under the original names.
  original, exported = {}, {}
  for directory, tensors in ((folder, original), (out, exported)):
    for file in os.listdir(directory):
      if file.endswith(".safetensors"):
        tensors.update(load_file(os.path.join(directory, file)))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # config.json says the same model (exported in the pre-transformers-5 rope layout).
  assert hf.model_fields(hf.read_json(os.path.join(out, "config.json"))) == hf.model_fields(
      hf.read_json(os.path.join(folder, "config.json")))


def test_loop_layout_loads_the_same_weights():
  folder = os.path.join(FIXTURES, "qwen2_bias")
  _, model, _, _, scanned = imported(folder, "qwen2_bias")
  _, _, _, _, loop = imported(folder, "qwen2_bias", scan_layers=False)
  for i in range(model.cfg.n_layers):
    for a, b in zip(jax.tree.leaves(loop[f"layers_{i}"]), jax.tree.leaves(scanned["layers"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])


def test_import_into_a_workdir_then_generate(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  folder = os.path.join(FIXTURES, "llama_tied_llama3")
  workdir = str(tmp_path / "run")
  hf.import_checkpoint(folder, workdir, template="test", dtype="float32",
                       overrides=[f"mesh.{k}={v}" for k, v in DEFAULT_MESH.items()])
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["rope_scaling"] == "llama3" and saved["model"]["tie_embeddings"]
  state = ocp.PyTreeCheckpointer().metadata(os.path.join(workdir, "checkpoints", "0", "state"))
  assert set(state.item_metadata.tree) == {"step", "params", "opt_state"}  # the trainer's layout
  session = generate.load(workdir)  # params only, straight into their shardings
  _, _, _, _, direct = imported(folder, "llama_tied_llama3")
  for a, b in zip(jax.tree.leaves(session.params), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  golden = np.load(os.path.join(folder, "golden.npz"))
  prompts = [[int(t) for t in row if t >= 0] for row in golden["prompts"]]
  out = session.generate_ids(prompts, max_new_tokens=8, stop_tokens=())
  np.testing.assert_array_equal(np.array(out), golden["greedy"])


# ------------------------------------------------------------------ bad input

def broken_copy(tmp_path, name: str, **changes) -> str:
  folder = str(tmp_path / name)
  shutil.copytree(os.path.join(FIXTURES, name), folder)
  path = os.path.join(folder, "config.json")
  hf_config = {**hf.read_json(path), **changes}
  with open(path, "w") as f:
    json.dump(hf_config, f)
  return folder


def load_from(folder):
  config = hf.import_config(hf.read_json(os.path.join(folder, "config.json")), "test", "float32")
  model = transformer.Transformer(transformer.ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)
  return hf.load_params(folder, model.cfg, generate.abstract_params(model, config, mesh))


def test_weights_that_disagree_with_their_config(tmp_path):
  folder = broken_copy(tmp_path, "llama_gqa", intermediate_size=48)
  with pytest.raises(hf.WeightShapeError, match=(
      r"tensor model\.layers\.0\.mlp\.gate_proj\.weight in model\.safetensors has shape "
      r"\(64, 32\), but config\.json implies \(48, 32\) \(.*intermediate_size=48")):
    load_from(folder)
  folder = broken_copy(tmp_path / "kv", "mistral_window", num_key_value_heads=4)
  with pytest.raises(hf.WeightShapeError, match=(
      r"tensor model\.layers\.0\.self_attn\.k_proj\.weight in model-0000\d-of-00003\.safetensors "
      r"has shape \(16, 32\), but config\.json implies \(32, 32\)")):
    load_from(folder)
  folder = broken_copy(tmp_path / "layers", "llama_gqa", num_hidden_layers=3)
  with pytest.raises(hf.WeightShapeError, match=r"no tensor model\.layers\.2\."):
    load_from(folder)
  folder = broken_copy(tmp_path / "bias", "llama_gqa", model_type="qwen2",
                      architectures=["Qwen2ForCausalLM"])
  with pytest.raises(hf.WeightShapeError, match=r"no tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
    load_from(folder)  # Qwen2 has q/k/v biases; these Llama weights do not


def test_unsupported_architectures_are_clear_errors(tmp_path):
  llama = hf.read_json(os.path.join(FIXTURES, "llama_gqa", "config.json"))
  cases = [
      (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
       r"model_type='gpt2', architectures=\['GPT2LMHeadModel'\] is not supported; foundation "
       r"imports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
      (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
      (dict(hidden_act="gelu"), "hidden_act='gelu'"),
      (dict(attention_bias=True), "attention_bias=True"),
      (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
       "rope_scaling type 'yarn' is not supported"),
  ]
  for changes, message in cases:
    with pytest.raises(hf.UnsupportedModelError, match=message):
      hf.model_fields({**llama, **changes})
  # The command line says it in one line.
  folder = broken_copy(tmp_path, "llama_gqa", model_type="gpt2", architectures=["GPT2LMHeadModel"])
  result = subprocess.run(
      [sys.executable, "-m", "foundation.hf", "import", "--source", folder, "--workdir",
       str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: config.json: model_type='gpt2'")


def test_old_and_new_rope_layouts_read_alike():
  new = hf.read_json(os.path.join(FIXTURES, "llama_tied_llama3", "config.json"))
  old = {k: v for k, v in new.items() if k != "rope_parameters"}
  old["rope_theta"] = new["rope_parameters"]["rope_theta"]
  old["rope_scaling"] = {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"}
  old["rope_scaling"]["type"] = old["rope_scaling"].pop("rope_type")  # the oldest spelling
  fields = hf.model_fields(new)
  assert fields == hf.model_fields(old)
  assert fields["rope_scaling"] == "llama3" and fields["rope_theta"] == 500_000.0
  assert fields["rope_original_max_len"] == 32 and fields["head_dim"] == 24


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def fibonacci(n):\n  return n", "hello world"] * 10, trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  ours = data.make_tokenizer(path)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 1)
  ids = ours.encode("hello world")
  assert ours.bos_id not in ids and ours.decode([ours.bos_id] + ids + [ours.eos_id]) == \
      "hello world"
  # tokenizer_config.json beside it names the special tokens (an instruct model's EOS).
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": None, "eos_token": {"content": "<|eot_id|>"}}, f)
  ours = data.make_tokenizer(path)
  assert (ours.bos_id, ours.eos_id) == (0, 2)  # no bos named: the usual name still found


def test_damaged_import_sources_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^--source .*nowhere: no such file or folder$"):
    hf.checkpoint_files(str(tmp_path / "nowhere"))
  folder = broken_copy(tmp_path, "llama_gqa")
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
  with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
    load_from(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write("{")
  with pytest.raises(ValueError, match=r"config.json is not JSON"):
    hf.read_json(os.path.join(folder, "config.json"))
  llama = hf.read_json(os.path.join(FIXTURES, "llama_gqa", "config.json"))
  with pytest.raises(hf.UnsupportedModelError, match=r"q_proj, k_proj, v_proj and o_proj"):
    hf.model_fields({**llama, "attention_bias": True})


def test_byte_tokenizer_export_describes_the_ids(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  files = data.tokenizers.byte_tokenizer_files()
  tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
  ours = data.ByteTokenizer()
  for text in ["def f(x):\n\treturn x", "héllo ✓ 日本 🙂", " "]:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == ours.encode(text) and tok.decode(ids) == text
  assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
  for name, contents in files.items():
    (tmp_path / name).write_bytes(contents)
  again = data.make_tokenizer(str(tmp_path / "tokenizer.json"))  # and foundation reads it back
  assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (0, 1, 2, 259)
