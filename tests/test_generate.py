"""Generation: KV-cache decoding equals recomputing the whole sequence, sampling, stops, the CLI.

8 simulated CPU devices; the model is size=test, its params in their training shardings on a
data=2 x fsdp=2 x tensor=2 mesh.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from foundation import generate
from foundation import hf
from foundation import mesh as mesh_lib
from foundation import optim
from foundation import step as step_lib
from foundation.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
PROMPT_LENGTHS = (5, 17, 1)  # padded to the data-parallel degree (4) with a finished row
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def sharded():
  """(config, model, params in training shardings, mesh, rules) on data=2, fsdp=2, tensor=2."""
  config = lm.get_config("size=test")
  with config.unlocked():
    config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = step_lib.make_model(config)
  optimizer = optim.make_optimizer(config)
  _, shardings = step_lib.state_shardings(model, optimizer, config, mesh)
  params = step_lib.init_state(model, optimizer, config, mesh, shardings)["params"]
  assert step_lib.is_sharded_like(params, shardings["params"])
  return config, model, params, mesh, mesh_lib.rules(config)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [[int(t) for t in rng.integers(3, 259, n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def cached_greedy(sharded, prompts):
  config, model, params, mesh, rules = sharded
  return generate.generate(model, params, prompts, max_new_tokens=NEW_TOKENS, max_len=128,
                           mesh=mesh, axis_rules=rules)


def recomputed_greedy(model, params, prompts, new_tokens, width=32):
  """Greedy decoding the slow way: the whole sequence through the model again for every token."""

  @jax.jit
  def next_token(buffer, length):
    segments = (jnp.arange(width) < length).astype(jnp.int32)[None]
    positions = jnp.arange(width, dtype=jnp.int32)[None]
    logits = model.apply({"params": params}, buffer, positions, segments)
    return jnp.argmax(logits[0, length - 1])

  out = []
  for prompt in prompts:
    ids = list(prompt)
    for _ in range(new_tokens):
      buffer = np.zeros((1, width), np.int32)
      buffer[0, :len(ids)] = ids
      ids.append(int(next_token(buffer, len(ids))))
    out.append(ids[len(prompt):])
  return out


def test_kv_cache_decoding_equals_full_recomputation(sharded, prompts, cached_greedy):
  """Prompts of lengths 5, 17 and 1 in one left-padded batch, params sharded over 8 devices."""
  config, model, params, mesh, rules = sharded
  assert [len(ids) for ids in cached_greedy] == [NEW_TOKENS] * len(prompts)
  with step_lib.sharding_context(config, mesh):
    want = recomputed_greedy(model, params, prompts, NEW_TOKENS)
  assert cached_greedy == want
  # A prompt's continuation does not depend on the batch it shares (padding is invisible).
  alone = generate.generate(model, params, prompts[1:2], max_new_tokens=NEW_TOKENS, max_len=128,
                            mesh=mesh, axis_rules=rules)
  assert alone == cached_greedy[1:2]


def test_greedy_continuation_uses_the_cached_decoder(sharded, prompts, cached_greedy):
  """The trainer's sample: BOS + text, cut from the left to fit, decoded up to EOS."""
  from foundation import data
  config, model, params, mesh, _ = sharded
  tokenizer = data.ByteTokenizer()
  text = tokenizer.decode(prompts[0][1:])  # prompts[0] minus its first id, which plays BOS here
  with step_lib.sharding_context(config, mesh):
    out = generate.greedy_continuation(model, params, tokenizer, text, 6, max_len=128)
    ids = generate.generate(model, params, [[tokenizer.bos_id] + tokenizer.encode(text)],
                            max_new_tokens=6, max_len=128, stop_tokens=(tokenizer.eos_id,))[0]
  assert out == tokenizer.decode(ids)


def test_stop_tokens_and_the_context_end_stop_a_row(sharded, prompts, cached_greedy):
  config, model, params, mesh, rules = sharded
  stop = cached_greedy[0][3]
  out = generate.generate(model, params, prompts, max_new_tokens=NEW_TOKENS, max_len=128,
                          stop_tokens=(stop,), mesh=mesh, axis_rules=rules)
  for row, full in zip(out, cached_greedy):
    cut = full.index(stop) if stop in full else len(full)
    assert row == full[:cut]  # the stop token ends the row and is not returned
  # Context of 20 tokens: the 17-token prompt gets 3 new tokens, the others all 10.
  out = generate.generate(model, params, prompts, max_new_tokens=NEW_TOKENS, max_len=20,
                          mesh=mesh, axis_rules=rules)
  assert [len(r) for r in out] == [10, 3, 10]
  assert out == [full[:len(r)] for r, full in zip(out, cached_greedy)]


def test_a_prompt_longer_than_the_context_is_an_error(sharded, prompts):
  _, model, params, mesh, rules = sharded
  with pytest.raises(ValueError, match=r"prompt 1 is 17 tokens long, but the model's context is "
                                       r"16 tokens"):
    generate.generate(model, params, prompts, max_new_tokens=4, max_len=16, mesh=mesh,
                      axis_rules=rules)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    generate.check_prompt_lengths([0], 16)


def test_sampling(sharded, prompts, cached_greedy):
  _, model, params, mesh, rules = sharded
  run = functools.partial(generate.generate, model, params, prompts, max_new_tokens=NEW_TOKENS,
                          max_len=128, mesh=mesh, axis_rules=rules)
  hot = generate.Sampling(temperature=1.0, top_k=50, top_p=0.95)
  first = run(sampling=hot, seed=5)
  assert first == run(sampling=hot, seed=5) != run(sampling=hot, seed=6)  # seeded: reproducible
  assert first != cached_greedy and [len(r) for r in first] == [NEW_TOKENS] * len(prompts)
  with pytest.raises(ValueError, match="top_p=0"):
    generate.Sampling(top_p=0.0)


def test_sample_logits_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)

  def frequencies(sampling):
    ids = generate.sample_logits(logits, keys, sampling)
    return np.bincount(np.asarray(ids), minlength=4) / len(ids)

  np.testing.assert_allclose(frequencies(generate.Sampling(1.0)), [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)
  np.testing.assert_allclose(frequencies(generate.Sampling(1.0, top_k=2)), [0.625, 0.375, 0, 0],
                             atol=0.03)
  # top_p=0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it: the two first tokens stay.
  np.testing.assert_allclose(frequencies(generate.Sampling(1.0, top_p=0.7)), [0.625, 0.375, 0, 0],
                             atol=0.03)
  assert frequencies(generate.Sampling(0.0))[0] == 1.0


# ------------------------------------------------------------------ the command line

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """An imported HF model (byte tokenizer: the fixture's 96 ids are ASCII bytes)."""
  path = str(tmp_path_factory.mktemp("generate") / "llama")
  hf.import_checkpoint(os.path.join(FIXTURES, "llama_gqa"), path, template="test",
                       dtype="float32", params_only=True)
  return path


def test_session_and_chat_history(workdir):
  session = generate.load(workdir)
  assert session.step == 0 and session.max_len == 64
  chat = generate.Chat(session, reply_tokens=8)
  first = chat.send("hi")
  assert chat.history == [("hi", first)]
  # The next turn's prompt holds the history; one too long for the context loses its oldest turns.
  chat.history += [(f"message {i}", "reply") for i in range(4)]
  chat.send("and then?")
  assert len(chat.history) == 6 and len(chat.last_prompt) <= 64 - 8
  prompt = session.tokenizer.decode(chat.last_prompt)
  assert "User: hi" not in prompt and prompt.endswith("User: and then?\nAssistant:")
  assert chat.transcript("x", chat.history[:1]).startswith(f"User: hi\nAssistant: {first}\n")


def test_command_line(workdir):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = subprocess.run(
      [sys.executable, "-m", "foundation.generate", "--workdir", workdir, "--interactive",
       "--max_new_tokens", "6", "--temperature", "0.7", "--top_k", "20"],
      input="hello\n/reset\nhow are you\n", cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("model> ") == 2
  assert "step 0" in result.stderr and "fsdp=2" in result.stderr
  bad = subprocess.run(
      [sys.executable, "-m", "foundation.generate", "--workdir", workdir, "--prompt", "x" * 80],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "prompt 0 is 81 tokens long, but the model's context is 64 tokens" in bad.stderr


def test_an_older_config_json_loads_with_todays_defaults(tmp_path):
  config = lm.get_config("size=test").to_dict()
  for field in ("qkv_bias", "rope_scaling", "rope_scaling_factor", "sliding_window"):
    del config["model"][field]  # a run from before these fields existed
  (tmp_path / "config.json").write_text(json.dumps(config))
  loaded = generate.load_config(str(tmp_path), ["mesh.tensor=2", "model.dtype=bfloat16"])
  mcfg = transformer.ModelConfig.from_config(loaded.model)
  assert (mcfg.qkv_bias, mcfg.rope_scaling, mcfg.sliding_window) == (False, "none", 0)
  assert loaded.mesh.tensor == 2 and mcfg.dtype == "bfloat16"
  with pytest.raises(ValueError, match="'mesh.tensr' is not a config field"):
    generate.load_config(str(tmp_path), ["mesh.tensr=2"])
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    generate.load(str(tmp_path / "nowhere"))
