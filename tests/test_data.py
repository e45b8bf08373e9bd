"""Tests of the tf.data input: tokenizers, packing, per-host shares, exact resume, sources, errors.

Real tf.data pipelines over small corpora written into tmp_path (plus the embedded stdlib corpus
and a TFDS dataset built locally); no mocks, no network.
"""

import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import lm
from foundation import data
from foundation.data import packing
from foundation.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
BOS, EOS = 1, 2
MARKER = re.compile(r"<doc(\d{3})>")
WORDS = "def return class import self lambda yield données café naïve 日本語 ✓ the of and".split()


def make_config(source: str = "embedded", **data_fields):
  """The size=test config (batch 16, seq_len 32, vocab 384), unlocked, with data.* overrides."""
  config = lm.get_config("size=test").unlock()
  config.data.source = source
  for name, value in data_fields.items():
    config.data[name] = value
  return config


def document(i: int, rng: random.Random, words: int) -> str:
  """A document that names itself (<docNNN>) so tests can tell where its tokens went."""
  return f"<doc{i:03d}> " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n"


def write_corpus(directory, count: int, seed: int = 0, subdir_every: int = 3) -> list[str]:
  """Writes `count` documents as .txt files (some in a subfolder, for '**'); returns the texts."""
  rng = random.Random(seed)
  texts = []
  for i in range(count):
    text = document(i, rng, rng.randint(3, 60))
    folder = directory / "sub" if i % subdir_every == 0 else directory
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    texts.append(text)
  return texts


def files_source(directory) -> str:
  return f"files:{directory}/**/*.txt"


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def stream(batches, field: str = "inputs") -> np.ndarray:
  """The batches' rows in order, concatenated into one token stream."""
  return np.concatenate([b[field].reshape(-1) for b in batches])


def markers(batches) -> set[int]:
  """Which <docNNN> markers appear in the (in-order) token stream of `batches`."""
  text = data.make_tokenizer("byte").decode(stream(batches))
  return {int(m) for m in MARKER.findall(text)}


def assert_batches_equal(expected, got):
  assert len(expected) == len(got)
  for step, (a, b) in enumerate(zip(expected, got)):
    for name in FIELDS:
      np.testing.assert_array_equal(a[name], b[name], err_msg=f"batch {step}, {name}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """40 small documents: enough files for two hosts to read disjoint files."""
  directory = tmp_path_factory.mktemp("corpus")
  return directory, write_corpus(directory, 40)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus):
  """A SentencePiece model trained through the command line, as a user would."""
  output = tmp_path_factory.mktemp("sp") / "sp.model"
  result = subprocess.run(
      [sys.executable, "-m", "foundation.tokenizer", "--config", "configs/lm.py:size=test",
       "--vocab_size", "320", "--output", str(output),
       f"--config.data.source={files_source(corpus[0])}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert str(output) in result.stdout
  return str(output)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_and_in_graph_encoding():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tok = data.make_tokenizer("byte")
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  text = "def f(x):\n\treturn 'naïve café 日本語 😀'\n"
  ids = tok.encode(text)
  assert ids[:3] == [ord("d") + 3, ord("e") + 3, ord("f") + 3]
  assert min(ids) >= 3 and max(ids) < 259 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode([BOS] + ids + [EOS, 0, 0]) == text  # specials and padding vanish
  assert tok.decode([0xE6 + 3, ord("A") + 3]) == "\ufffdA"  # a broken UTF-8 byte does not raise
  np.testing.assert_array_equal(tok.tf_encode(tf.constant(text.encode("utf-8"))).numpy(), ids)


def test_sentencepiece_cli_model_round_trip(sp_model):
  tok = data.make_tokenizer(sp_model)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert 259 < tok.vocab_size <= 320
  text = "def naïve(x):\n    return 'café 日本語 😀 ünseen'\n\n\t  end  "
  ids = tok.encode(text)
  assert BOS not in ids and EOS not in ids
  assert tok.decode(ids) == text  # byte fallback + identity normalisation: exact round trip
  assert tok.decode([BOS] + ids + [EOS, 0]) == text
  assert len(ids) < len(text.encode("utf-8"))  # it learned pieces longer than a byte


# ---------------------------------------------------------------- packing

def test_packing_segments_and_positions_at_document_and_row_boundaries():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  docs = tf.data.Dataset.from_tensor_slices(["abc", "defghijklm", "", "xy"])
  rows = packing.pack_rows(docs, data.make_tokenizer("byte"), seq_len=6)
  batch = next(iter(rows.batch(8).map(packing.finish_batch)))
  batch = {name: value.numpy() for name, value in batch.items()}
  b = lambda s: [ord(c) + 3 for c in s]  # noqa: E731
  # Stream: [1 a b c][1 d … m][1][1 x y] = 19 tokens -> 3 rows of 6; the last 'y' is dropped.
  np.testing.assert_array_equal(batch["inputs"], [
      [BOS, *b("abc"), BOS, *b("d")],
      b("efghij"),
      [*b("klm"), BOS, BOS, *b("x")]])
  np.testing.assert_array_equal(batch["targets"], [
      [*b("abc"), EOS, *b("de")],
      b("fghijk"),
      [*b("lm"), EOS, EOS, *b("xy")]])
  np.testing.assert_array_equal(batch["segment_ids"], [
      [1, 1, 1, 1, 2, 2],
      [1, 1, 1, 1, 1, 1],   # a row that starts mid-document starts segment 1
      [1, 1, 1, 2, 3, 3]])  # the empty document is a one-token segment ([bos] -> eos)
  np.testing.assert_array_equal(batch["positions"], [
      [0, 1, 2, 3, 0, 1],
      [0, 1, 2, 3, 4, 5],   # positions restart at a row start
      [0, 1, 2, 0, 0, 1]])
  np.testing.assert_array_equal(batch["loss_mask"], np.ones((3, 6)))
  assert all(batch[name].dtype == np.int32 for name in FIELDS)


def test_train_epoch_keeps_every_token_of_every_document_exactly_once(tmp_path):
  rng = random.Random(1)
  texts = [document(i, rng, rng.randint(1, 80)) for i in range(30)]
  tok = data.make_tokenizer("byte")
  tokens_per_batch = 16 * 32
  # Pad the last document so one epoch is a whole number of batches: the count is then exact.
  total = sum(len(tok.encode(t)) + 1 for t in texts)
  texts[-1] += "z" * (-total % tokens_per_batch)
  for i, text in enumerate(texts):
    (tmp_path / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
  epoch_batches = sum(len(tok.encode(t)) + 1 for t in texts) // tokens_per_batch
  # No row shuffle, so rows arrive in stream order and documents can be cut back out of it.
  config = make_config(f"files:{tmp_path}/*.txt", eval_fraction=0.0, shuffle_buffer=1)
  it = data.make_train_iterator(config, 0, 1)

  def documents_of(batches):
    inputs, targets = stream(batches, "inputs"), stream(batches, "targets")
    starts = list(np.flatnonzero(inputs == BOS)) + [len(inputs)]
    assert starts[0] == 0  # the epoch starts at a document start
    return [(tuple(inputs[a:b]), tuple(targets[a:b])) for a, b in zip(starts[:-1], starts[1:])]

  expected = sorted((tuple([BOS] + tok.encode(t)), tuple(tok.encode(t) + [EOS])) for t in texts)
  first = documents_of(take(it, epoch_batches))
  second = documents_of(take(it, epoch_batches))
  assert sorted(first) == expected
  assert sorted(second) == expected
  assert first != second  # documents are reshuffled every epoch


def test_embedded_source_batches_have_the_contract_shapes_and_consistent_segments():
  root, paths = sources.embedded_files()
  assert len(paths) > 500 and paths == sorted(paths)
  relative = [os.path.relpath(p, root).split(os.sep) for p in paths]
  assert not any({"test", "tests", "idle_test", "site-packages"} & set(parts) for parts in relative)
  config = make_config("embedded", shuffle_buffer=16)
  batches = take(data.make_train_iterator(config, 0, 1), 5)
  for batch in batches:
    assert set(batch) == set(FIELDS)
    for name in FIELDS:
      assert batch[name].shape == (16, 32) and batch[name].dtype == np.int32, name
    inputs, segments, positions = batch["inputs"], batch["segment_ids"], batch["positions"]
    np.testing.assert_array_equal(batch["loss_mask"], 1)
    # A new segment begins exactly at column 0 and at each bos; positions restart there.
    new_segment = np.concatenate([np.ones((16, 1), bool), inputs[:, 1:] == BOS], axis=1)
    np.testing.assert_array_equal(segments, np.cumsum(new_segment, axis=1))
    np.testing.assert_array_equal(positions == 0, new_segment)
    same = segments[:, 1:] == segments[:, :-1]
    np.testing.assert_array_equal(positions[:, 1:][same], positions[:, :-1][same] + 1)
    # Next-token pairs: within a segment, a target is the following input.
    np.testing.assert_array_equal(batch["targets"][:, :-1][same], inputs[:, 1:][same])


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize("setup", ["files", "files+sentencepiece", "embedded", "tfds", "synthetic"])
def test_restore_gives_the_next_20_batches_byte_identical(setup, corpus, tmp_path, request):
  if setup == "synthetic":
    config = make_config("synthetic")
  elif setup == "tfds":
    config = make_config("tfds:tiny_text", tfds_data_dir=request.getfixturevalue("tfds_dir"),
                         shuffle_buffer=16)
  elif setup == "embedded":
    config = make_config("embedded", shuffle_buffer=32)
  else:
    config = make_config(files_source(corpus[0]), shuffle_buffer=64, prefetch=3)
    if setup == "files+sentencepiece":
      config.data.tokenizer = request.getfixturevalue("sp_model")
  it = data.make_train_iterator(config, 0, 1)
  take(it, 7)
  it.save(str(tmp_path))
  assert any(name.startswith("process_0of1") for name in os.listdir(tmp_path))
  uninterrupted = take(it, 20)
  resumed = data.make_train_iterator(config, 0, 1)
  resumed.restore(str(tmp_path))
  assert_batches_equal(uninterrupted, take(resumed, 20))
  fresh = next(data.make_train_iterator(config, 0, 1))
  assert not np.array_equal(fresh["inputs"], uninterrupted[0]["inputs"])  # the test has teeth


def test_synthetic_source_needs_no_tensorflow():
  code = ("import sys; from configs import lm; from foundation import data\n"
          "c = lm.get_config('size=test')\n"
          "c.unlock().data.source = 'synthetic'\n"
          "b = next(data.make_train_iterator(c, 1, 2)); e = data.make_eval_batches(c, 1, 2)\n"
          "assert b['inputs'].shape == (8, 32) and len(e) == c.eval.steps\n"
          "assert b['inputs'].min() >= 3 and b['inputs'].max() < c.model.vocab_size\n"
          "assert 'tensorflow' not in sys.modules, 'synthetic imported tensorflow'\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------- hosts

def test_two_processes_read_disjoint_files(corpus):
  directory, texts = corpus
  config = make_config(files_source(directory), eval_fraction=0.0, shuffle_buffer=1)
  seen = []
  for process_index in (0, 1):
    batches = take(data.make_train_iterator(config, process_index, 2), 30)  # > 1 epoch per host
    assert all(b[name].shape == (8, 32) for b in batches for name in FIELDS)
    seen.append(markers(batches))
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(len(texts)))


def test_with_few_files_the_hosts_split_the_global_batches_of_one_host(tmp_path):
  write_corpus(tmp_path, 3)
  config = make_config(files_source(tmp_path), eval_fraction=0.0, shuffle_buffer=64)
  single = take(data.make_train_iterator(config, 0, 1), 4)
  hosts = [take(data.make_train_iterator(config, p, 2), 4) for p in (0, 1)]
  # Every host runs the one-host pipeline and keeps its half of each batch: the global batches
  # (and so the losses) do not depend on the host count.
  for step, batch in enumerate(single):
    for name in FIELDS:
      np.testing.assert_array_equal(batch[name][:8], hosts[0][step][name])
      np.testing.assert_array_equal(batch[name][8:], hosts[1][step][name])


def test_eval_batches_are_deterministic_and_disjoint_from_train(corpus):
  directory, texts = corpus
  config = make_config(files_source(directory), eval_fraction=0.25, shuffle_buffer=1)
  config.eval.steps = 3
  evals = data.make_eval_batches(config, 0, 1)
  assert len(evals) == 3
  assert all(b[name].shape == (16, 32) and b[name].dtype == np.int32
             for b in evals for name in FIELDS)
  assert_batches_equal(evals, data.make_eval_batches(config, 0, 1))
  held_out = {int(MARKER.search(f"<{os.path.basename(p)[:-4]}>").group(1))
              for p in sources.file_split(config, "eval")}
  train_seen = markers(take(data.make_train_iterator(config, 0, 1), 25))  # > 1 epoch
  eval_seen = markers(evals)
  assert eval_seen and eval_seen <= held_out
  assert train_seen == set(range(len(texts))) - held_out
  two_hosts = [data.make_eval_batches(config, p, 2) for p in (0, 1)]
  assert all(len(e) == 3 and e[0]["inputs"].shape == (8, 32) for e in two_hosts)


def test_train_eval_split_depends_only_on_relative_paths():
  names = [f"d{i}/f{i}.txt" for i in range(200)]
  split_a = sources.split_train_eval("/a", [f"/a/{n}" for n in names], 0.1)
  split_b = sources.split_train_eval("/elsewhere/b", [f"/elsewhere/b/{n}" for n in names], 0.1)
  assert [os.path.relpath(p, "/a") for p in split_a[1]] == [
      os.path.relpath(p, "/elsewhere/b") for p in split_b[1]]
  assert 5 < len(split_a[1]) < 40 and not set(split_a[0]) & set(split_a[1])
  # A tiny corpus still holds one file out rather than evaluating on nothing.
  assert len(sources.split_train_eval("/a", ["/a/x.txt", "/a/y.txt"], 0.02)[1]) == 1


# ---------------------------------------------------------------- SentencePiece in the pipeline

def test_sentencepiece_tokenizer_in_the_pipeline(corpus, sp_model):
  directory, texts = corpus
  tok = data.make_tokenizer(sp_model)
  config = make_config(files_source(directory), tokenizer=sp_model, shuffle_buffer=1)
  batch = next(data.make_train_iterator(config, 0, 1))
  assert batch["inputs"].max() < tok.vocab_size and batch["inputs"].shape == (16, 32)
  text = tok.decode(batch["inputs"].reshape(-1))
  assert MARKER.search(text) and any(t.strip() in text for t in texts)


# ---------------------------------------------------------------- TFDS

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  directory = tmp_path_factory.mktemp("tfds")
  rng = random.Random(2)
  split = lambda ids: tf.data.Dataset.from_tensor_slices(  # noqa: E731
      {"text": [document(i, rng, 15) for i in ids]})
  tfds.dataset_builders.TfDataBuilder(
      name="tiny_text", config="default", version="1.0.0", data_dir=str(directory),
      split_datasets={"train": split(range(0, 60)), "validation": split(range(60, 70))},
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
  ).download_and_prepare()
  return str(directory)


def test_tfds_source_reads_train_and_eval_splits(tfds_dir):
  config = make_config("tfds:tiny_text", tfds_data_dir=tfds_dir, shuffle_buffer=1)
  hosts = [markers(take(data.make_train_iterator(config, p, 2), 20)) for p in (0, 1)]
  assert hosts[0] and hosts[1] and not hosts[0] & hosts[1]
  assert hosts[0] | hosts[1] == set(range(60))
  evals = data.make_eval_batches(config, 0, 1)
  assert len(evals) == config.eval.steps and markers(evals) <= set(range(60, 70))
  assert_batches_equal(evals, data.make_eval_batches(config, 0, 1))


@pytest.mark.parametrize("fields, message", [
    (dict(source="tfds:lm1bb"), r"no registered dataset 'lm1bb'.*close matches: lm1b"),
    (dict(source="tfds:lm1b"), r"not prepared in data.tfds_data_dir="),
    (dict(text_feature="content"), r"data.text_feature='content'.*features \['text'\]"),
    (dict(train_split="nosuch"), r"data.train_split='nosuch'.*splits \['train', 'validation'\]"),
])
def test_tfds_errors_are_clear(tfds_dir, fields, message):
  config = make_config(**{"source": "tfds:tiny_text", "tfds_data_dir": tfds_dir, **fields})
  with pytest.raises(ValueError, match=message) as error:
    data.make_train_iterator(config, 0, 1)
  assert len(str(error.value)) < 600  # close matches, not TFDS's list of every dataset


# ---------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("fields, message", [
    (dict(source="hf:wikitext"), r"data.source='hf:wikitext': unknown kind 'hf'"),
    (dict(source="files:/no/such/dir/*.txt"), r"the glob '/no/such/dir/\*.txt' matches no files"),
    (dict(tokenizer="/no/such/sp.model"), r"data.tokenizer='/no/such/sp.model': no such"),
])
def test_bad_data_config_errors_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    data.make_train_iterator(make_config(**fields), 0, 1)


def test_tokenizer_larger_than_model_vocab_is_an_error():
  config = make_config("embedded")
  config.model.vocab_size = 200
  with pytest.raises(ValueError, match=r"vocab_size 259, more than model.vocab_size=200"):
    data.make_eval_batches(config, 0, 1)


def test_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(ValueError, match=r"batch_size=16 .* not divisible by the process count 3"):
    data.make_train_iterator(make_config("synthetic"), 0, 3)


def test_restore_from_a_folder_without_this_process_state_is_an_error(tmp_path):
  it = data.make_train_iterator(make_config("synthetic"), 0, 2)
  it.save(str(tmp_path))
  other = data.make_train_iterator(make_config("synthetic"), 1, 2)
  with pytest.raises(ValueError, match=r"no data-iterator state process_1of2"):
    other.restore(str(tmp_path))
