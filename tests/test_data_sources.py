"""File formats (text, JSONL, TFRecord), the UTF-8 policy, and clear errors for bad files."""

import gzip
import json

import numpy as np
import pytest

from foundation import data
from foundation.data import sources
from test_data import document, make_config, markers, take

ALL = set(range(24))


def docs(count: int = 24) -> list[str]:
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(3)
  return [document(i, rng, rng.randint(3, 40)) for i in range(count)]


def write_jsonl(path, records, compress: bool = False) -> None:
  text = "".join(json.dumps(r) + "\n" for r in records) + "\n"  # a trailing blank line
  path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())


def write_tfrecord(path, texts, feature: str = "text") -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.TFRecordWriter(str(path)) as writer:
    for i, text in enumerate(texts):
      example = tf.train.Example(features=tf.train.Features(feature={
          feature: tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
          "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))}))
      writer.write(example.SerializeToString())


def epoch_markers(config, batches: int = 12) -> set[int]:
  return markers(take(data.make_train_iterator(config, 0, 1), batches))


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "tfrecord"])
def test_multi_document_files_yield_every_document(fmt, tmp_path):
  texts = docs()
  for part in (0, 1):  # two files, each holding half of the documents
    chunk = texts[part::2]
    if fmt.startswith("jsonl"):
      write_jsonl(tmp_path / f"part{part}.{fmt}", [{"id": i, "body": t} for i, t in
                                                   enumerate(chunk)], fmt.endswith(".gz"))
    else:
      write_tfrecord(tmp_path / f"part{part}.tfrecord", chunk, feature="body")
  config = make_config(f"files:{tmp_path}/part*", eval_fraction=0.0, shuffle_buffer=1,
                       text_feature="body")
  assert epoch_markers(config) == ALL  # > one epoch: every document of both files


def test_the_file_format_can_be_forced_and_mixed_formats_are_refused(tmp_path):
  write_jsonl(tmp_path / "a.data", [{"text": t} for t in docs()])
  forced = make_config(f"files:{tmp_path}/*.data", eval_fraction=0.0, shuffle_buffer=1,
                       file_format="jsonl")
  assert epoch_markers(forced) == ALL
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}))
  with pytest.raises(ValueError, match=r"matches files of several formats: jsonl \(b.jsonl\), "
                                       r"text \(a.data\); give each format its own source"):
    data.make_train_iterator(make_config(f"files:{tmp_path}/*"), 0, 1)


@pytest.mark.parametrize("fmt, message", [
    ("jsonl", r"data.text_feature='text': the JSONL lines of .*a.jsonl .* have no such string "
              r"field; the first has \['body', 'id'\]"),
    ("tfrecord", r"data.text_feature='text': the records of .*a.tfrecord .* have no such bytes "
                 r"feature; they have \{'body': 'bytes_list', 'id': 'int64_list'\}"),
])
def test_a_missing_field_lists_the_fields_that_exist(fmt, message, tmp_path):
  if fmt == "jsonl":
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "x"}])
  else:
    write_tfrecord(tmp_path / "a.tfrecord", ["x"], feature="body")
  with pytest.raises(ValueError, match=message):
    data.make_train_iterator(make_config(f"files:{tmp_path}/a.*", eval_fraction=0.0), 0, 1)


def test_a_bad_json_line_names_its_file_and_line(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
  it = data.make_train_iterator(make_config(f"files:{path}", eval_fraction=0.0), 0, 1)
  with pytest.raises(ValueError, match=r"^data error: .*a.jsonl:2 is not a JSON line"):
    next(it)


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_text_that_is_not_utf8_fails_or_is_skipped_as_configured(fmt, tmp_path, capfd):
  texts = docs()
  bad = "<doc099> caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1")
  if fmt == "text":
    for i, text in enumerate(texts):
      (tmp_path / f"d{i:02d}.txt").write_text(text)
    (tmp_path / "latin1.txt").write_bytes(bad)
    source, where = f"files:{tmp_path}/*.txt", r"latin1.txt"
  else:
    lines = [json.dumps({"text": t}).encode() for t in texts]
    lines.insert(5, b'{"text": "' + bad.strip() + b'"}')
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source, where = f"files:{tmp_path}/a.jsonl", r"a.jsonl:6"
  config = make_config(source, eval_fraction=0.0, shuffle_buffer=1)
  with pytest.raises(ValueError, match=rf"data error: .*{where} is not UTF-8 text \("
                                       rf"data.invalid_utf8='fail'; set it to 'skip'"):
    take(data.make_train_iterator(config, 0, 1), 12)
  config.data.invalid_utf8 = "skip"
  capfd.readouterr()
  batches = take(data.make_train_iterator(config, 0, 1), 12)
  assert markers(batches) == ALL  # every good document, the bad one dropped
  assert 99 not in markers(batches)
  skipped = [line for line in capfd.readouterr().err.splitlines() if "data: skipped" in line]
  assert skipped and all(where.replace("\\", "") in line for line in skipped)


def test_a_bad_utf8_policy_is_a_clear_error():
  with pytest.raises(ValueError, match=r"data.invalid_utf8='ignore' is not one of"):
    data.make_eval_batches(make_config("embedded", invalid_utf8="ignore"), 0, 1)


def test_eval_rows_are_the_same_whatever_the_host_count(tmp_path):
  for i, text in enumerate(docs()):
    (tmp_path / f"d{i:02d}.txt").write_text(text)
  config = make_config(f"files:{tmp_path}/*.txt", eval_fraction=0.3)
  config.eval.steps = 8  # more than the split holds: it is used whole, the rest is padding
  one = data.make_eval_batches(config, 0, 1)
  two = [data.make_eval_batches(config, p, 2) for p in (0, 1)]
  assert len(one) == len(two[0]) == len(two[1]) < 8  # every host runs the same number of steps
  for step, batch in enumerate(one):
    for name, value in batch.items():
      np.testing.assert_array_equal(value, np.concatenate([two[0][step][name],
                                                           two[1][step][name]]))
  mask = np.concatenate([b["loss_mask"] for b in one])
  assert mask[-1].sum() == 0 and 0 < mask.sum() < mask.size  # the last batch is padded
  held_out = sources.file_split(config, "eval")
  tok = data.make_tokenizer("byte")
  expected = sum(len(tok.encode(open(p).read())) + 1 for p in held_out)
  assert mask.sum() == expected  # every eval token counted exactly once


@pytest.mark.parametrize("fmt", ["jsonl", "tfrecord"])
def test_a_single_file_holds_out_documents_for_eval(fmt, tmp_path):
  """One JSONL/TFRecord file and eval_fraction > 0: its documents are split by text hash into
  disjoint train and eval sets that together are the whole file; the trainer's batches follow."""
  texts = docs(200)
  path = tmp_path / f"all.{fmt}"
  if fmt == "jsonl":
    write_jsonl(path, [{"text": t} for t in texts])
  else:
    write_tfrecord(path, texts)
  config = make_config(f"files:{path}", eval_fraction=0.2)
  source = sources.parse_source(config.data.source)

  def split_texts(split):
    return [d.decode() for d in
            data.documents.all_documents(config, source, split).as_numpy_iterator()]
  train, held_out = split_texts("train"), split_texts("eval")
  assert sorted(train + held_out) == sorted(texts) and not set(train) & set(held_out)
  assert 20 <= len(held_out) <= 60  # about 20% of 200
  eval_batches = data.make_eval_batches(config, 0, 1)  # no longer "the eval split is empty"
  assert sum(int(b["loss_mask"].sum()) for b in eval_batches) > 0
  # The eval documents never reach the train iterator.
  seen = markers(take(data.make_train_iterator(config, 0, 1), 6))
  held_out_markers = markers([{"inputs": np.frombuffer("".join(held_out).encode(), np.uint8)
                               .astype(np.int32) + 3}])
  assert seen and not seen & held_out_markers
  # A single text file is one document: it cannot be split, and says so.
  (tmp_path / "one.txt").write_text(texts[0])
  one_text = make_config(f"files:{tmp_path}/one.txt", eval_fraction=0.2)
  with pytest.raises(ValueError, match=r"the (train|eval) split is empty \(1 files"):
    for split in ("train", "eval"):  # the file lands in one split; the other is empty
      sources.file_split(one_text, split)
