"""Mixtures of sources: the periodic order's arithmetic, realised shares, nothing dropped or
repeated, exact resume (one and two processes), and clear errors for bad weights."""

import numpy as np
import pytest

from foundation import data
from foundation.data import mixture
from test_data import assert_batches_equal, make_config, take

LOWER, UPPER = "abcdefghijklm", "NOPQRSTUVWXYZ"


def write_alphabet_corpus(directory, letters: str, count: int, seed: int) -> None:
  """Documents made only of `letters` (and spaces), so each row's source shows in its bytes."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    words = ["".join(rng.choice(list(letters), size=rng.integers(2, 9))) for _ in range(
        rng.integers(20, 120))]
    (directory / f"d{i:03d}.txt").write_text(" ".join(words) + "\n")


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  write_alphabet_corpus(root / "lower", LOWER, 12, seed=1)
  write_alphabet_corpus(root / "upper", UPPER, 12, seed=2)
  return f"files:{root}/lower/*.txt", f"files:{root}/upper/*.txt"


def row_sources(batches) -> list[str]:
  """'lower' or 'upper' for every row, read from its bytes (bos/eos/space ignored)."""
  tok = data.make_tokenizer("byte")
  labels = []
  for batch in batches:
    for row in batch["inputs"]:
      letters = set(tok.decode(row).replace(" ", "").replace("\n", ""))
      assert letters <= set(LOWER) or letters <= set(UPPER), letters
      labels.append("lower" if letters <= set(LOWER) else "upper")
  return labels


def test_the_periodic_order_gives_exact_shares_and_positions_by_arithmetic():
  counts = mixture.slot_counts([0.8, 0.2])
  assert list(counts) == [8000, 2000]
  assert list(mixture.slot_counts([1, 1, 1])) == [3334, 3333, 3333]
  assert mixture.slot_counts([1e-9, 1.0])[0] == 1  # a tiny positive weight is never dropped
  counts = mixture.slot_counts([0.5, 0.3, 0.2])
  order = np.tile(mixture.pattern(counts), 3)
  for q in range(0, len(order), 997):
    # Every prefix of the order is within one row per source of its share.
    shares = np.bincount(order[:q], minlength=3)
    assert np.all(np.abs(shares - q * np.array([0.5, 0.3, 0.2])) <= 1.0 + 1e-9), q
    np.testing.assert_array_equal(mixture.rows_before(q, counts), shares)
  source, within = mixture.locate(np.arange(len(order)), counts)
  np.testing.assert_array_equal(source, order)
  for k in range(3):  # each source's rows are numbered 0, 1, 2, ... in order of appearance
    np.testing.assert_array_equal(within[source == k], np.arange((source == k).sum()))


def test_mixture_rows_follow_the_weights_and_each_source_keeps_its_own_stream(two_corpora):
  lower, upper = two_corpora
  config = make_config(mixture=f"{lower}:3,{upper}:1", eval_fraction=0.0, shuffle_buffer=1)
  it = data.make_train_iterator(config, 0, 1)
  batches = take(it, 8)
  labels = row_sources(batches)
  assert labels.count("lower") == 96 and labels.count("upper") == 32  # 3:1 of 128 rows exactly
  shares = it.metrics()
  assert sorted(shares.values()) == [0.25, 0.75]
  assert all(k.startswith("data/files_") for k in shares)
  # The lower-case rows of the mixture are exactly the rows of the lower source alone: mixing
  # drops and repeats nothing (and packing keeps every token once per epoch: test_data.py).
  alone = take(data.make_train_iterator(make_config(lower, eval_fraction=0.0, shuffle_buffer=1),
                                        0, 1), 6)
  mixed_rows = np.concatenate([b["inputs"] for b in batches])[np.array(labels) == "lower"]
  np.testing.assert_array_equal(mixed_rows, np.concatenate([b["inputs"] for b in alone])[:96])
  assert "data: files:" in data.summary(it) and "75.0%" in data.summary(it)


@pytest.mark.parametrize("setup", ["single source", "mixture", "mixture, 2 processes"])
def test_restore_gives_the_next_50_batches_byte_identical(setup, two_corpora, tmp_path):
  lower, upper = two_corpora
  if setup == "single source":
    config = make_config(lower, shuffle_buffer=64)
  else:
    config = make_config(mixture=f"{lower}:0.7,{upper}:0.3,embedded:0.2", shuffle_buffer=64)
  process_count = 2 if "2 processes" in setup else 1
  iterators = [data.make_train_iterator(config, p, process_count) for p in range(process_count)]
  for it in iterators:
    take(it, 9)
    it.save(str(tmp_path))  # all processes write into one checkpoint folder
  expected = [take(it, 50) for it in iterators]
  shares = [it.metrics() for it in iterators]
  for p in range(process_count):
    resumed = data.make_train_iterator(config, p, process_count)
    resumed.restore(str(tmp_path))
    assert_batches_equal(expected[p], take(resumed, 50))
    assert resumed.metrics() == shares[p]  # the realised shares resume too
  if process_count == 2:  # the hosts read different rows
    assert not np.array_equal(expected[0][0]["inputs"], expected[1][0]["inputs"])


@pytest.mark.parametrize("text, message", [
    ("files:/a/*.txt:-0.5,embedded:1", r"the weight of 'files:/a/\*.txt' is -0.5, negative"),
    ("embedded:0,files:/a/*.txt:0", r"the weights sum to 0.0; at least one must be positive"),
    ("embedded,files:/a/*.txt:1", r"'embedded' needs a weight after its last colon"),
    ("embedded:1,hf:x:1", r"data.mixture source 'hf:x': unknown kind 'hf'"),
    ("embedded:1,synthetic:1", r"'synthetic' cannot be mixed"),
    ("embedded:1,prepared:/p:1", r"mixes prepared and on-the-fly sources"),
    ("embedded:1,files:/no/such/*.txt:1", r"data.mixture source 'files:/no/such/\*.txt': the "),
    (",", r"names no source"),
])
def test_bad_mixtures_are_clear_errors(text, message):
  with pytest.raises(ValueError, match=message):
    data.make_train_iterator(make_config(mixture=text), 0, 1)


def test_the_trainer_logs_the_realised_shares(two_corpora, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from foundation import train  # pylint: disable=g-import-not-at-top
  from test_train import small_run_config  # pylint: disable=g-import-not-at-top
  config = small_run_config(6, seq_len=32)
  with config.unlocked():
    config.data.mixture = f"{two_corpora[0]}:0.75,{two_corpora[1]}:0.25"
    config.data.eval_fraction = 0.0
  train.train(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_records = [r for r in records if r["split"] == "train"]
  assert len(train_records) == 6
  shares = {k: v for k, v in train_records[-1].items() if k.startswith("data/")}
  assert len(shares) == 2, train_records[-1]
  # The shares of the 6 x 16 rows the run consumed: an iterator at the same position agrees.
  iterator = data.make_train_iterator(config, 0, 1)
  take(iterator, 6)
  assert shares == pytest.approx(iterator.metrics(), abs=1e-6)
  assert sum(shares.values()) == pytest.approx(1.0)
  assert 0.6 < max(shares.values()) < 0.9, shares
