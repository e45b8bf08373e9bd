"""Fine-tuning pieces: LoRA as a param transform (adapters, exactness, frozen base, merging,
memory, an old workdir's fields), SFT and classification data
(templates, masks, packing, errors, resume, host split), the classifier head and its loss.

CPU, float32, the size=test model; compiles are shared where they can be.
"""

import csv
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import finetune as finetune_config
from foundation import finetune
from foundation import lora
from foundation.data import classify
from foundation.data import examples as examples_lib
from foundation.data import sft
from foundation.data import tokenizers
from foundation.models import transformer

BYTES = tokenizers.ByteTokenizer()


def model_cfg(**fields) -> transformer.ModelConfig:
  config = finetune_config.get_config("task=sft,base=test").unlock()
  config.model.update(fields)
  return transformer.ModelConfig.from_config(config.model)


def batch_of(rows: list[list[int]], length: int = 16):
  """tokens, positions, segment_ids [len(rows), length]: row r holds documents of those lengths."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, (len(rows), length)).astype(np.int32)
  positions, segments = np.zeros_like(tokens), np.zeros_like(tokens)
  for r, docs in enumerate(rows):
    col = 0
    for s, n in enumerate(docs, start=1):
      positions[r, col:col + n], segments[r, col:col + n] = np.arange(n), s
      col += n
  return tokens, positions, segments


BATCH = batch_of([[5, 9], [12]])


@functools.lru_cache
def init_params(cfg: transformer.ModelConfig, seed: int = 0):
  """Params like the model's init, drawn in numpy from the init's shapes (compiling the init
  costs seconds per config on a small CPU): norms 1, the head 0 (as the real init), the
  embedding normal(1), other matrices normal(0.1)."""
  shapes = nn.unbox(jax.eval_shape(transformer.Transformer(cfg).init, jax.random.key(0),
                                   *BATCH))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = "/".join(str(k.key) for k in path)
    if "norm" in name:
      return np.ones(leaf.shape, np.float32)
    if "classifier" in name:
      return np.zeros(leaf.shape, np.float32)
    std = 1.0 if "embedding" in name else 0.1
    return (std * rng.normal(size=leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache
def jitted_apply(cfg: transformer.ModelConfig):
  return jax.jit(transformer.Transformer(cfg).apply)


def paths(tree) -> list[str]:
  return sorted("/".join(str(k.key) for k in p) for p, _ in
                jax.tree_util.tree_leaves_with_path(tree))


# ---------------------------------------------------------------- LoRA

# v: kv-head outputs; o: two contracted input axes; wi_up: the MLP. (Every target compiles slower.)
LORA = dict(rank=4, alpha=8.0, targets="attn/(v|o)$|mlp/wi_up$")


def run_config(trainable: str = "", **lora_fields):
  """The fine-tuning run config of the test model with these lora.* fields."""
  config = finetune_config.get_config("task=sft,base=test").unlock()
  config.lora.update(lora_fields)
  config.trainable = trainable
  return config


def boxed_params(cfg: transformer.ModelConfig):
  """`init_params`'s values in the init's nn.Partitioned boxes (logical names attached)."""
  boxed = jax.eval_shape(transformer.Transformer(cfg).init, jax.random.key(0), *BATCH)["params"]
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda box, value: box.replace_boxed(value), boxed, init_params(cfg),
                      is_leaf=is_box)


@functools.lru_cache
def adapted_params(**fields):
  """The test model's params with adapters (lora.add_adapters on the boxed init), unboxed."""
  return nn.unbox(lora.add_adapters(boxed_params(model_cfg()), run_config(**fields),
                                    jax.random.key(1)))


def test_lora_adds_adapters_beside_the_targeted_kernels_only():
  plain = init_params(model_cfg())
  assert paths(plain) == sorted(
      ["embed/embedding", "final_norm/scale", "output/kernel"]
      + [f"layers/{m}/kernel" for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/wi_gate",
                                        "mlp/wi_up", "mlp/wo")]
      + ["layers/attn_norm/scale", "layers/mlp_norm/scale"])
  boxed = boxed_params(model_cfg())
  assert lora.add_adapters(boxed, run_config(), None) is boxed  # rank 0: the tree as it is
  adapted = adapted_params(rank=4, targets="attn/(q|v)$")
  assert set(paths(adapted)) - set(paths(plain)) == {
      f"layers/attn/{m}/{leaf}" for m in "qv" for leaf in ("lora_a", "lora_b")}
  q = adapted["layers"]["attn"]["q"]
  assert q["lora_a"].shape == (2, 64, 4)          # [layers, in: embed, r]
  assert q["lora_b"].shape == (2, 4, 4, 16)       # [layers, r, out: heads, head_dim]
  assert not np.any(q["lora_b"])                  # the adapted model starts as the base
  assert 0.7 < float(np.std(q["lora_a"])) * np.sqrt(64) < 1.3   # fan-in scaled
  # o reads two axes (heads, head_dim) and writes embed: in = both.
  o = adapted_params(rank=8, targets="attn/o$")["layers"]["attn"]["o"]
  assert o["lora_a"].shape == (2, 4, 16, 8) and o["lora_b"].shape == (2, 8, 64)
  # The adapters' logical names follow their kernel's, so they shard like it.
  boxed = lora.add_adapters(boxed_params(model_cfg()), run_config(rank=4, targets="attn/o$"),
                            jax.random.key(1))
  assert boxed["layers"]["attn"]["o"]["lora_a"].names == ("layers", "heads", "head_dim", None)
  assert boxed["layers"]["attn"]["o"]["lora_b"].names == ("layers", None, "embed")


def test_lora_config_errors():
  with pytest.raises(ValueError, match=r"lora.targets='attn/wq\$' matches no kernel; the "
                                       r"model's are .*layers/attn/q"):
    adapted_params(rank=4, targets="attn/wq$")
  for fields, message in [(dict(rank=-1), "lora.rank=-1 must be >= 0"),
                          (dict(rank=2, alpha=0.0), "lora.alpha=0.0 must be > 0"),
                          (dict(rank=2, targets="attn/(q"), "lora.targets='attn/\\(q' is not")]:
    with pytest.raises(ValueError, match=message):
      lora.check(run_config(**fields))
  with pytest.raises(ValueError, match="trainable='head/\\[': 'head/\\[' is not a regular"):
    finetune.trainable_patterns(run_config(trainable="head/["))


def test_lora_with_zero_b_is_exactly_the_base_model():
  config = run_config(**LORA)
  params, report = finetune.overlay_pretrained(adapted_params(**LORA), init_params(model_cfg()),
                                               config)
  assert report["ignored"] == [] and all("lora_" in p for p in report["new"])
  assert len(report["new"]) == 6  # lora_a and lora_b on 3 projections (scanned: one leaf each)
  merged = lora.model_params(params, config)
  assert paths(merged) == paths(init_params(model_cfg()))
  for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(init_params(model_cfg()))):
    np.testing.assert_array_equal(got, want)


def test_lora_trains_adapters_only():
  cfg, config = model_cfg(), run_config(**LORA)
  model = transformer.Transformer(cfg)
  params, _ = finetune.overlay_pretrained(adapted_params(**LORA), init_params(cfg), config)
  optimizer = finetune.freeze_untrained(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)), config)
  opt_state = optimizer.init(params)
  tokens, positions, segments = BATCH
  targets = np.roll(tokens, -1, axis=1)

  def loss_fn(p):  # as the train step: the transform is differentiated through
    logits = model.apply({"params": lora.model_params(p, config)}, tokens, positions, segments)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * (segments != 0)) / jnp.sum(segments != 0)

  @jax.jit
  def train_step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses, new = [], params
  for _ in range(5):
    new, opt_state, loss = train_step(new, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  mask = finetune.trainable_mask(new, config)
  for (path, before), after, trains in zip(jax.tree_util.tree_leaves_with_path(params),
                                           jax.tree.leaves(new), jax.tree.leaves(mask)):
    name = "/".join(str(k.key) for k in path)
    assert trains == ("lora_" in name), name
    if not trains:  # the base: bit for bit (weight decay and clipping did not touch it)
      assert np.asarray(after).tobytes() == np.asarray(before).tobytes(), name
  assert float(jnp.abs(new["layers"]["mlp"]["wi_up"]["lora_b"]).max()) > 0

  # The report: adapters only, and Adam's two moments for them alone.
  report = finetune.trainable_report(new, mask)
  per_layer = 4 * ((64 + 2 * 16) + (4 * 16 + 64) + (64 + 128))   # r * (in + out): v, o, wi_up
  assert report["trainable"] == 2 * per_layer == 3_328
  assert report["adam_state_bytes"] == 2 * 4 * report["trainable"]
  moments = [x for x in jax.tree.leaves(opt_state) if x.ndim]  # less the step counter
  assert finetune.tree_bytes(moments) == report["adam_state_bytes"]
  assert "trainable: 3,328 of" in finetune.describe(report)


def test_lora_merge_is_the_adapted_projection_for_scanned_and_two_axis_inputs():
  """x . merged kernel == x . W + alpha / r * (x . A) . B, for o's kernel [layers, heads, hd, d]
  (the adapter reads both input axes), against numpy."""
  rng = np.random.default_rng(0)
  node = {"kernel": rng.normal(size=(3, 4, 5, 6)).astype(np.float32),   # [layers, heads, hd, d]
          "lora_a": rng.normal(size=(3, 4, 5, 2)).astype(np.float32),
          "lora_b": rng.normal(size=(3, 2, 6)).astype(np.float32)}
  merged = lora.merge({"o": node}, alpha=3.0)["o"]
  assert set(merged) == {"kernel"}
  x = rng.normal(size=(7, 4, 5)).astype(np.float32)
  for layer in range(3):
    got = np.einsum("thd,hde->te", x, np.asarray(merged["kernel"][layer]))
    low = np.einsum("thd,hdr->tr", x, node["lora_a"][layer])
    want = (np.einsum("thd,hde->te", x, node["kernel"][layer])
            + 1.5 * low @ node["lora_b"][layer])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_an_old_workdirs_lora_fields_load_as_the_lora_group(tmp_path):
  from foundation import generate  # pylint: disable=g-import-not-at-top
  saved = finetune_config.get_config("task=sft,base=test").to_dict()
  del saved["lora"], saved["trainable"]
  saved["model"].update(lora_rank=8, lora_alpha=32.0, lora_dropout=0.05, lora_targets="attn,wo")
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = generate.load_config(str(tmp_path))
  assert config.lora.to_dict() == {"rank": 8, "alpha": 32.0,
                                   "targets": "(attn|mlp)/(q|k|v|o|wo)$"}
  assert not [k for k in config.model if k.startswith("lora_")]


def test_overlay_pretrained_names_a_shape_mismatch():
  other = init_params(model_cfg(mlp_dim=64))
  with pytest.raises(ValueError, match=r"param layers/mlp/wi_gate/kernel: the pre-trained "
                                       r"checkpoint has shape \(2, 64, 64\), this model "
                                       r"\(2, 64, 128\)"):
    finetune.overlay_pretrained(adapted_params(**LORA), other, run_config(**LORA))


# ---------------------------------------------------------------- classifier head

def test_classifier_head_loss_and_accuracy_match_numpy():
  cfg = model_cfg(num_classes=3)
  params, report = finetune.overlay_pretrained(init_params(cfg), init_params(model_cfg()),
                                               run_config())
  assert report["new"] == ["classifier/bias", "classifier/kernel"]
  assert report["ignored"] == ["output/kernel"]  # a classifier has no vocabulary output
  assert not np.any(params["classifier"]["kernel"])  # zero init: uniform predictions
  rng = np.random.default_rng(1)
  params = {**params, "classifier": {"kernel": rng.normal(size=(64, 3)).astype(np.float32),
                                     "bias": rng.normal(size=(3,)).astype(np.float32)}}
  tokens, positions, segments = batch_of([[7], [16], [3], []])
  batch = {"inputs": tokens, "positions": positions, "segment_ids": segments,
           "last_index": np.array([6, 15, 2, 0], np.int32),
           "labels": np.array([2, 0, 1, 1], np.int32),
           "label_mask": np.array([1, 1, 1, 0], np.int32)}   # the last row is eval padding
  model = transformer.Transformer(cfg)

  @jax.jit
  def run(params, batch):  # one compile: the sums, the hidden states, the default pooling
    args = ({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return (finetune.classify_loss_sums(model, params, batch),
            model.apply(*args, return_hidden=True), model.apply(*args))

  sums, hidden, default = run(params, batch)
  hidden = np.asarray(hidden, np.float64)
  logits = hidden[np.arange(4), batch["last_index"]] @ params["classifier"]["kernel"] + params[
      "classifier"]["bias"]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  real = batch["label_mask"] == 1
  ce = -logp[np.arange(4), batch["labels"]][real].sum()
  correct = (logits.argmax(-1) == batch["labels"])[real].sum()
  np.testing.assert_allclose(float(sums["ce_sum"]), ce, rtol=1e-5)
  assert float(sums["correct"]) == correct and float(sums["count"]) == 3
  # Without last_index the head reads the last non-padding column: the same logits here.
  np.testing.assert_allclose(default[:3], logits[:3], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SFT data

def write_jsonl(path, records) -> str:
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def sft_run_config(train_path, **fields):
  config = finetune_config.get_config("task=sft,base=test").unlock()
  config.sft.train_path = str(train_path)
  config.batch_size, config.seq_len, config.eval.steps = 4, 64, 3
  for dotted, value in fields.items():
    node, *parts, last = [config] + dotted.split(".")
    for part in parts:
      node = node[part]
    node[last] = value
  return config


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "six"}]}


def test_sft_loss_mask_is_exactly_the_assistant_tokens():
  example = sft.encode_chat(BYTES, sft.messages_of(CHAT, "x:1"))
  batch = sft.build_batch([example], [(0,)], seq_len=120)
  mask, targets, inputs = batch["loss_mask"][0], batch["targets"][0], batch["inputs"][0]
  trained = targets[mask == 1]
  assert BYTES.decode(trained) == "4six"
  assert (trained == BYTES.eos_id).sum() == 2  # each answer ends with eos, and it is trained
  n = len(example.ids) - 1
  assert BYTES.decode(inputs[:n]) == ("<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4"
                                      "<|user|>\nand 3+3?\n<|assistant|>\nsix")
  assert mask[n:].sum() == 0 and batch["segment_ids"][0, n:].sum() == 0
  # Generation continues exactly the prefix training saw before the first answer.
  prompt = sft.chat_prompt_ids(BYTES, sft.messages_of(CHAT, "x:1")[:2])
  assert example.ids[:len(prompt)].tolist() == prompt
  assert BYTES.decode(prompt).endswith("<|assistant|>\n")


def test_sft_packing_keeps_every_example(tmp_path):
  records = sft.python_function_records(40, seed=3)
  config = sft_run_config(write_jsonl(tmp_path / "a.jsonl", records), seq_len=512,
                          **{"sft.eval_fraction": 0.0})
  it = sft.make_sft_iterator(config, 0, 1)
  rows = it.plan(0)
  assert sorted(i for row in rows for i in row) == list(range(40))
  assert len(rows) < 40  # several examples share a row
  batch = it.build(rows)
  seen = []
  for r, row in enumerate(rows):
    for s in range(1, len(row) + 1):
      ids = batch["inputs"][r][batch["segment_ids"][r] == s]
      assert batch["positions"][r][batch["segment_ids"][r] == s].tolist() == list(range(len(ids)))
      seen.append(BYTES.decode(ids))
  prompts = sorted(f"<|user|>\n{r['prompt']}\n<|assistant|>\n{r['response']}" for r in records)
  assert sorted(seen) == prompts


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "bot", "content": "hi"}]}',
     r"a.jsonl:2: message 0 has role 'bot'; roles are system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}]}',
     r"a.jsonl:2: no assistant message \(roles \['user'\]\): nothing to train on"),
    ('{"prompt": "hi"}', r"a.jsonl:2: a record needs string fields 'prompt' and 'response'"),
    ('{"prompt": "hi", "response": ', r"a.jsonl:2 is not a JSON line"),
    ('{"prompt": "' + "x" * 80 + '", "response": "y"}',
     r"a.jsonl:2: the prompt is 105 tokens .* seq_len=64: no answer token fits"),
])
def test_sft_bad_records_are_clear_errors(tmp_path, line, message):
  path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}, line])
  with pytest.raises(ValueError, match=message):
    sft.make_sft_iterator(sft_run_config(path, **{"sft.eval_fraction": 0.0}), 0, 1)


def test_sft_long_answers_are_cut_or_refused(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "y" * 100}] * 3)
  it = sft.make_sft_iterator(sft_run_config(path, **{"sft.eval_fraction": 0.0}), 0, 1)
  batch = next(it)
  # One example a row, cut to 65 ids: the 26 prompt ids (bos, template, 'p') are context.
  assert batch["loss_mask"].sum() == 4 * (65 - 26)
  assert (batch["segment_ids"] == 1).all()
  with pytest.raises(ValueError, match=r"a.jsonl:1: the example is 126 tokens, longer than "
                                       r"seq_len=64 \(sft.overlong='error'"):
    sft.make_sft_iterator(sft_run_config(path, **{"sft.overlong": "error",
                                                  "sft.eval_fraction": 0.0}), 0, 1)


def assert_resumes_and_splits(make, tmp_path):
  """make(process_index, process_count) -> iterator: exact resume, hosts split each batch."""
  it = make(0, 1)
  for _ in range(5):  # several epochs of a small set
    next(it)
  it.save(str(tmp_path))
  want = [next(it) for _ in range(4)]
  restored = make(0, 1)
  restored.restore(str(tmp_path))
  for w in want:
    got = next(restored)
    assert all(got[k].tobytes() == w[k].tobytes() for k in w)
  # Two hosts, restored from the one-host position (it is global): each takes half of every
  # global batch, disjoint, together exactly the one-host batch.
  hosts = [make(p, 2) for p in range(2)]
  for h in hosts:
    h.restore(str(tmp_path))
  for w in want:
    parts = [next(h) for h in hosts]
    for k in w:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), w[k])
  json.loads(open(os.path.join(tmp_path, "process_0of1.json")).read())  # JSON, nothing pickled


def test_sft_iterator_resumes_exactly_and_splits_over_hosts(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", sft.python_function_records(30, seed=1))
  config = sft_run_config(path, seq_len=128)
  state = tmp_path / "state"
  state.mkdir()
  assert_resumes_and_splits(lambda p, n: sft.make_sft_iterator(config, p, n), state)
  it = sft.make_sft_iterator(config, 0, 1)
  assert it.description()["position_kind"] == "sft" and it.metrics()["data/epochs"] == 0
  # Another seed (another shuffle) refuses the saved position.
  with pytest.raises(ValueError, match="seed: saved 0, now 5"):
    sft.make_sft_iterator(sft_run_config(path, seq_len=128, seed=5), 0, 1).restore(str(state))


def test_sft_eval_batches_are_host_count_free(tmp_path):
  records = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(60)]
  config = sft_run_config(write_jsonl(tmp_path / "a.jsonl", records), seq_len=128,
                          **{"sft.eval_fraction": 0.3})
  one = sft.make_sft_eval_batches(config, 0, 1)
  two = [sft.make_sft_eval_batches(config, p, 2) for p in range(2)]
  assert len(two[0]) == len(two[1]) == len(one) <= config.eval.steps
  for b, batch in enumerate(one):
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([two[0][b][k], two[1][b][k]]), batch[k])
  # Every held-out record is in the rows (2 a row), the last batch padded with empty rows.
  trained = sum(BYTES.decode(b["targets"][b["loss_mask"] == 1]).count("answer") for b in one)
  assert trained == len(sft.read_split(config, "eval")[0])
  assert one[-1]["segment_ids"][-1].sum() == one[-1]["loss_mask"][-1].sum() == 0
  # The held-out records are not trained on.
  train = sft.read_split(config, "train")[0]
  held_out = sft.read_split(config, "eval")[0]
  assert len(train) + len(held_out) == 60 and 5 < len(held_out) < 30
  assert not {r.where for r in train} & {r.where for r in held_out}


def test_python_function_records_are_a_small_deterministic_task():
  records = sft.python_function_records(300)
  assert records == sft.python_function_records(300)
  assert len({r["prompt"] for r in records}) > 250
  size = sum(len(json.dumps(r)) for r in records)
  assert size < 200_000
  example = records[0]
  assert example["response"].startswith("def ") and "return" in example["response"]
  compile(example["response"], "<response>", "exec")  # valid Python


# ---------------------------------------------------------------- classification data

def classify_run_config(train_path, **fields):
  config = finetune_config.get_config("task=classify,base=test").unlock()
  config.classify.train_path = str(train_path)
  config.batch_size, config.seq_len, config.eval.steps = 4, 32, 2
  for dotted, value in fields.items():
    node, *parts, last = [config] + dotted.split(".")
    for part in parts:
      node = node[part]
    node[last] = value
  return config


def write_csv(path, rows, header=("text", "label")) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def test_classify_csv_with_string_labels(tmp_path):
  rows = [(f"review number {i}, with a comma", "pos" if i % 3 else "neg") for i in range(20)]
  config = classify_run_config(write_csv(tmp_path / "r.csv", rows))
  data = classify.ClassifyData(config)
  assert data.names == ["neg", "pos"]  # sorted
  tokens, labels = data.train
  texts = [BYTES.decode(t) for t in tokens]
  by_text = dict(rows)
  assert all(labels[i] == ["neg", "pos"].index(by_text[t]) for i, t in enumerate(texts))
  batch = classify.build_batch(tokens, labels, [(0,), ()], config.seq_len)
  k = len(tokens[0])
  assert batch["inputs"][0, k - 1] == BYTES.eos_id and batch["last_index"].tolist() == [k - 1, 0]
  assert batch["segment_ids"][0].tolist() == [1] * k + [0] * (32 - k)
  assert batch["label_mask"].tolist() == [1, 0] and batch["inputs"][1].sum() == 0
  # Three string labels for a two-class head, a missing column: clear errors.
  write_csv(tmp_path / "r.csv", rows + [("meh", "neutral")])
  with pytest.raises(ValueError, match=r"give 3 classes \['neg', 'neutral', 'pos'\] but "
                                       r"model.num_classes=2: set --config.model.num_classes=3"):
    classify.ClassifyData(config)
  with pytest.raises(ValueError, match=r"r.csv: the CSV header has no column 'sentence'"):
    classify.ClassifyData(classify_run_config(tmp_path / "r.csv",
                                              **{"classify.text_field": "sentence"}))


def test_classify_jsonl_int_labels_truncation_and_eval_file(tmp_path):
  train = write_jsonl(tmp_path / "t.jsonl", [{"text": "abcdefghij" * 5, "label": 1},
                                             {"text": "short", "label": 0}])
  evals = write_jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": 1},
                                             {"text": "y", "label": 2}])
  config = classify_run_config(train, **{"classify.eval_path": evals})
  with pytest.raises(ValueError, match=r"the integer labels give 3 classes \['0', '1', '2'\] but "
                                       r"model.num_classes=2"):
    classify.ClassifyData(config)
  config.classify.labels = "no,yes"  # names fix the ids: 2 is no id, 'maybe' no name
  write_jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": 2}, {"text": "y", "label": "maybe"}])
  with pytest.raises(ValueError, match=r"e.jsonl:1: label 2 is not one of the 2 classes "
                                       r"\['no', 'yes'\]"):
    classify.ClassifyData(config)
  config.classify.labels = ""
  write_jsonl(tmp_path / "e.jsonl", [{"text": "x", "label": 1}])
  data = classify.ClassifyData(config)
  assert data.names == ["0", "1"] and data.train[1].tolist() == [1, 0]
  assert BYTES.decode(data.train[0][0]) == ("abcdefghij" * 5)[:30]   # 'right': keeps the start
  config.classify.truncate = "left"
  assert BYTES.decode(classify.ClassifyData(config).train[0][0]) == ("abcdefghij" * 5)[-30:]
  write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"txt": "b", "label": 1}])
  with pytest.raises(ValueError, match=r"t.jsonl:2: a record needs a string 'text'"):
    classify.ClassifyData(config)


def test_classify_iterator_resumes_exactly_and_splits_over_hosts(tmp_path):
  rows = [(f"text {i} " * (i % 4 + 1), str(i % 2)) for i in range(11)]
  config = classify_run_config(write_csv(tmp_path / "r.csv", rows))
  state = tmp_path / "state"
  state.mkdir()
  assert_resumes_and_splits(lambda p, n: classify.make_classify_iterator(config, p, n), state)
  # Each epoch is a fresh permutation of all train examples.
  it = classify.make_classify_iterator(config, 0, 1)
  first, second = it.plan(0), it.plan(1)
  assert sorted(first) == sorted(second) == [(i,) for i in range(len(first))]
  assert first != second
  evals = classify.make_classify_eval_batches(config, 0, 1)
  n_eval = len(classify.ClassifyData(config).eval[0])
  assert sum(int(b["label_mask"].sum()) for b in evals) == min(n_eval, 8)


def test_classify_reads_prepared_tfds_and_names_unprepared_ones(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def split(n):
    return tf.data.Dataset.from_tensor_slices(
        {"text": [f"text {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
  features = tfds.features.FeaturesDict({
      "text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])})
  tfds.dataset_builders.TfDataBuilder(
      name="tiny_reviews", version="1.0.0", data_dir=str(tmp_path), features=features,
      split_datasets={"train": split(6), "test": split(3)}).download_and_prepare()
  config = classify_run_config("tfds:tiny_reviews", **{"data.tfds_data_dir": str(tmp_path)})
  data = classify.ClassifyData(config)
  assert data.names == ["neg", "pos"] and len(data.eval[0]) == 3
  texts = [BYTES.decode(t) for t in data.train[0]]
  assert sorted(texts) == [f"text {i}" for i in range(6)]
  assert [int(t[-1]) % 2 for t in texts] == data.train[1].tolist()

  config.classify.train_path = "tfds:imdb_reviews"
  with pytest.raises(ValueError, match=r"classify.train_path='tfds:imdb_reviews': the dataset is "
                                       r"not prepared.*Prepared in .*: \['tiny_reviews'\]"):
    classify.ClassifyData(config)


def test_finetune_configs():
  config = finetune_config.get_config("task=classify,base=test,lora")
  assert config.task == "classify" and config.model.num_classes == 2
  assert config.lora.rank == 8 and config.init_from == ""
  cfg = transformer.ModelConfig.from_config(config.model)
  boxed = boxed_params(cfg)
  mask = finetune.trainable_mask(nn.unbox(lora.add_adapters(boxed, config, jax.random.key(0))),
                                 config)
  trains = {"/".join(str(k.key) for k in p)
            for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  projections = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/wi_gate", "mlp/wi_up", "mlp/wo")
  assert trains == {"classifier/bias", "classifier/kernel"} | {
      f"layers/{p}/lora_{ab}" for p in projections for ab in "ab"}
  with pytest.raises(ValueError, match="task='chat' is unknown; tasks: sft, classify"):
    finetune_config.get_config("task=chat")


def test_examples_next_fit_and_hash_split():
  rows = examples_lib.next_fit(np.array([3, 5, 2, 6, 1]), np.array([4, 3, 2, 1, 0]), 8)
  assert rows == [(4, 3), (2, 1), (0,)]
  records = [examples_lib.Record(f"f:{i}", i, examples_lib.record_hash(str(i).encode()))
             for i in range(200)]
  train, held = examples_lib.hash_split(records, 0.1, "x")
  assert 5 < len(held) < 40 and len(train) + len(held) == 200
  assert examples_lib.hash_split(records, 0.1, "x") == (train, held)  # stable
