"""Image input: the pp ops against numpy, the embedded shapes, the input pipelines (embedded,
files, TFDS), exact resume, host-count-free eval, and the one-line errors."""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from foundation.data import image_input
from foundation.data import image_ops
from foundation.data import shapes

SEED = tf.constant([3, 4], tf.int64)


def image(h=12, w=10, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def run(spec, img, seed=SEED):
  return image_ops.compose(spec)(tf.constant(img), seed).numpy()


# ---------------------------------------------------------------- ops vs numpy

def test_value_range_is_linear_map():
  img = image()
  np.testing.assert_allclose(run("value_range(-1,1)", img), img / 255 * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(run("value_range(0, 1)", img), img / 255, atol=1e-6)


def test_center_crop_offsets():
  img = image(12, 9)
  np.testing.assert_array_equal(run("center_crop(4)", img), img[4:8, 2:6])
  np.testing.assert_array_equal(run("center_crop((5, 3))", img), img[3:8, 3:6])


def find_window(big, small):
  """The (top, left) where `small` sits in `big`."""
  h, w = small.shape[:2]
  hits = [(t, l) for t in range(big.shape[0] - h + 1) for l in range(big.shape[1] - w + 1)
          if np.array_equal(big[t:t + h, l:l + w], small)]
  assert len(hits) == 1
  return hits[0]


def test_random_crop_is_a_window_at_the_seeded_offset_and_deterministic():
  img = image(16, 16)
  corners = set()
  for s in range(12):
    seed = tf.constant([s, 7], tf.int64)
    out = run("random_crop(5)", img, seed)
    top, left = find_window(img, out)
    # the op's own offsets (op 0 of the chain draws from fold_in(seed, 0))
    expect = image_ops.crop_offsets(
        (16, 16), 5, tf.random.experimental.stateless_fold_in(seed, 0))
    assert (top, left) == tuple(int(x) for x in expect)
    np.testing.assert_array_equal(out, run("random_crop(5)", img, seed))
    corners.add((top, left))
  assert len(corners) > 6  # the offsets do vary with the seed


def test_flip_lr_flips_about_half_the_seeds():
  img = image()
  outs = [run("flip_lr", img, tf.constant([s, 0], tf.int64)) for s in range(40)]
  flipped = [np.array_equal(o, img[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, img) for f, o in zip(flipped, outs))
  assert 10 < sum(flipped) < 30


def test_resize_shape_dtype_and_range():
  img = image(20, 14)
  out = run("resize(8)", img)
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  assert out.min() >= img.min() and out.max() <= img.max()
  out = run("resize((6, 9))|value_range(0,1)", img)
  assert out.shape == (6, 9, 3) and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1
  flat = np.full((20, 14, 3), 77, np.uint8)
  np.testing.assert_array_equal(run("resize(8)", flat), np.full((8, 8, 3), 77))


def test_inception_crop_shape_and_determinism():
  img = image(40, 30)
  a = run("inception_crop(16)", img)
  assert a.shape == (16, 16, 3)
  np.testing.assert_array_equal(a, run("inception_crop(16)", img))
  others = [run("inception_crop(16, area_min=20)", img, tf.constant([s, 1], tf.int64))
            for s in range(4)]
  assert len({o.tobytes() for o in others}) > 1


def test_decode_png_and_pass_through():
  img = image()
  png = tf.io.encode_png(img)
  np.testing.assert_array_equal(image_ops.compose("decode")(png, SEED).numpy(), img)
  np.testing.assert_array_equal(run("decode", img), img)


def test_mixup_mixes_images_and_labels_alike():
  batch = {"image": tf.constant(np.stack([image(seed=i) for i in range(4)])),
           "label": tf.constant([0, 1, 2, 3])}
  out = image_ops.mixup(batch, SEED, 0.5, 5)
  labels = out["labels"].numpy()
  np.testing.assert_allclose(labels.sum(1), 1, atol=1e-6)
  ratio = labels[1, 1]
  expect = ratio * batch["image"].numpy()[1] + (1 - ratio) * batch["image"].numpy()[0]
  np.testing.assert_allclose(out["image"].numpy()[1], expect, atol=1e-3)


@pytest.mark.parametrize("spec, message", [
    ("decode|flip_rl", r"pp=.*unknown op 'flip_rl'; did you mean 'flip_lr'\?"),
    ("decode|resize(", r"'resize\(' is not an op"),
    ("resize(1, 2, 3, 4, 5)", r"resize"),
])
def test_bad_specs_are_one_line(spec, message):
  with pytest.raises(ValueError, match=message) as error:
    image_ops.compose(spec)
  assert "\n" not in str(error.value)


# ---------------------------------------------------------------- shapes

def test_shapes_are_deterministic_balanced_and_distinct_splits():
  x, y = shapes.load("train", 0, 200, 32)
  assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(y), [20] * 10)
  # load() is the same pure function every time (not only via its cache)
  np.testing.assert_array_equal(shapes.load.__wrapped__("train", 0, 200, 32)[0], x)
  e, _ = shapes.load("eval", 0, 200, 32)
  assert not any((e == img).all(axis=(1, 2, 3)).any() for img in x[:20])
  assert shapes.load("train", 0, 10, 48)[0].shape == (10, 48, 48, 3)


# ---------------------------------------------------------------- input pipelines

def make_config(**data) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.eval = ml_collections.ConfigDict(dict(steps=3))
  config.model = ml_collections.ConfigDict(dict(num_classes=10))
  config.data = image_input.image_data_config()
  config.data.update(dict(num_train=64, num_eval=20,
                          pp_train="decode|random_crop(28)|resize(32)|flip_lr|value_range(-1,1)"))
  config.data.update(data)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_embedded_train_batches_and_exact_resume(tmp_path):
  config = make_config()
  it = image_input.make_train_iterator(config, 0, 1)
  first = take(it, 3)
  b = first[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["label_mask"].tolist() == [1] * 8
  assert -1 <= b["image"].min() < 0 < b["image"].max() <= 1
  it.save(str(tmp_path))
  after = take(it, 10)  # crosses the epoch end (64 examples = 8 batches)
  fresh = image_input.make_train_iterator(config, 0, 1)
  fresh.restore(str(tmp_path))
  assert_batches_equal(take(fresh, 10), after)
  # a fresh iterator repeats the same pixels (the random ops are keyed per example)
  again = image_input.make_train_iterator(config, 0, 1)
  assert_batches_equal(take(again, 3), first)
  assert fresh.description()["epoch"] == 1 and 1 < fresh.metrics()["data/epochs"] < 2


def test_mixup_on_train_batches_mixes_rows_and_resumes_exactly(tmp_path):
  """data.mixup > 0: each train batch is the unmixed batch (same pixels: the pp seeds are the
  example's) mixed with itself rolled by a row, soft labels alike; eval batches carry one-hot
  soft labels; a restored iterator mixes the same."""
  plain = take(image_input.make_train_iterator(make_config(), 0, 1), 2)
  it = image_input.make_train_iterator(make_config(mixup=0.4), 0, 1)
  mixed = take(it, 2)
  for x, m in zip(plain, mixed):
    onehot = np.eye(10, dtype=np.float32)[x["label"]]
    ratio = float(m["soft_label"][0] @ onehot[0]) if x["label"][0] != x["label"][-1] else None
    np.testing.assert_allclose(m["soft_label"].sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(m["label"], x["label"])
    if ratio is not None:
      np.testing.assert_allclose(m["image"], ratio * x["image"] + (1 - ratio) * np.roll(
          x["image"], 1, axis=0), atol=1e-5)
      np.testing.assert_allclose(m["soft_label"], ratio * onehot + (1 - ratio) * np.roll(
          onehot, 1, axis=0), atol=1e-6)
  assert not np.allclose(mixed[0]["image"], plain[0]["image"])
  it.save(str(tmp_path))
  after = take(it, 3)
  fresh = image_input.make_train_iterator(make_config(mixup=0.4), 0, 1)
  fresh.restore(str(tmp_path))
  assert_batches_equal(take(fresh, 3), after)
  evals = image_input.eval_batches(make_config(mixup=0.4), 0, 1)
  np.testing.assert_array_equal(evals[0]["soft_label"],
                                np.eye(10, dtype=np.float32)[evals[0]["label"]])


def test_two_hosts_split_each_global_batch():
  config = make_config()
  one = take(image_input.make_train_iterator(config, 0, 1), 2)
  hosts = [take(image_input.make_train_iterator(config, p, 2), 2) for p in (0, 1)]
  for step in range(2):
    for key in one[step]:
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
      np.testing.assert_array_equal(joined, one[step][key])


def test_resume_refuses_other_data(tmp_path):
  it = image_input.make_train_iterator(make_config(), 0, 1)
  next(it)
  it.save(str(tmp_path))
  other = image_input.make_train_iterator(make_config(num_train=80), 0, 1)
  with pytest.raises(ValueError, match=r"belongs to other data"):
    other.restore(str(tmp_path))


def test_eval_batches_padded_and_host_count_free():
  config = make_config()  # 20 eval images, batch 8: 3 batches, the last with 4 padding rows
  one = image_input.eval_batches(config, 0, 1)
  assert len(one) == 3 and [int(b["label_mask"].sum()) for b in one] == [8, 8, 4]
  x, y = shapes.load("eval", 0, 20, 32)
  np.testing.assert_allclose(one[0]["image"], x[:8] / 127.5 - 1, atol=1e-5)
  np.testing.assert_array_equal(one[1]["label"], y[8:16])
  two = [image_input.eval_batches(config, p, 2) for p in (0, 1)]
  for step in range(3):
    for key in one[step]:
      np.testing.assert_array_equal(
          np.concatenate([two[0][step][key], two[1][step][key]]), one[step][key])


def write_folder(root, classes=("cat", "dog", "eel"), per_class=4, size=(20, 16), channels=3):
  for k, name in enumerate(classes):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      img = np.full((*size, channels), 40 * k + i, np.uint8)
      tf.io.write_file(os.path.join(root, name, f"{i}.png"), tf.io.encode_png(img))
  return str(root)


def test_files_source_reads_class_folders(tmp_path):
  root = write_folder(tmp_path / "imgs")
  write_folder(tmp_path / "imgs" / "test", per_class=1)
  config = make_config(source=f"files:{root}", image_size=8, pp_train="decode|resize(8)",
                       pp_eval="decode|center_crop(8)")
  config.model.num_classes = 3
  assert image_input.class_names(config) == ("cat", "dog", "eel")
  batch = next(image_input.make_train_iterator(config, 0, 1))
  assert batch["image"].shape == (8, 8, 8, 3)
  # each image is one flat value 40 * class + i: the label is readable from the pixels
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0] // 40, batch["label"])
  evals = image_input.eval_batches(config, 0, 1)
  assert evals[0]["label_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
  assert evals[0]["label"][:3].tolist() == [0, 1, 2]


def test_files_errors_are_one_line(tmp_path):
  root = write_folder(tmp_path / "a")
  config = make_config(source=f"files:{root}", image_size=8, pp_train="decode|resize(8)")
  config.model.num_classes = 2
  with pytest.raises(ValueError, match=r"has 3 classes but model.num_classes=2"):
    image_input.make_train_iterator(config, 0, 1)
  config.model.num_classes = 3
  os.makedirs(tmp_path / "a" / "empty")
  with pytest.raises(ValueError, match=r"class folder .*empty' holds no images"):
    image_input.make_train_iterator(config, 0, 1)
  os.rmdir(tmp_path / "a" / "empty")
  write_folder(tmp_path / "a", classes=("cat",), per_class=1, channels=1)  # cat/0.png now grey
  with pytest.raises(ValueError, match=r"mixed channel counts: 1 \(.*cat/0.png\), 3 \("):
    image_input.make_train_iterator(config, 0, 1)
  config.data.source = f"files:{tmp_path / 'nothing'}"
  with pytest.raises(ValueError, match=r"is not a folder"):
    image_input.make_train_iterator(config, 0, 1)


def test_pp_output_shape_and_label_errors():
  with pytest.raises(ValueError, match=r"data.pp_train='decode\|resize\(16\)' gives images of "
                                       r"shape \(16, 16, 3\), not .*\(32, 32, 3\)"):
    image_input.make_train_iterator(make_config(pp_train="decode|resize(16)"), 0, 1)
  config = make_config()
  config.model.num_classes = 5
  with pytest.raises(ValueError, match=r"has 10 classes but model.num_classes=5"):
    image_input.eval_batches(config, 0, 1)
  with pytest.raises(ValueError, match=r"unknown op 'fliplr'; did you mean 'flip_lr'"):
    image_input.make_train_iterator(make_config(pp_train="decode|fliplr"), 0, 1)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  directory = tmp_path_factory.mktemp("tfds")
  def split(start, n):
    x, y = shapes.load("train", 5, start + n, 16)
    return tf.data.Dataset.from_tensor_slices({"image": x[start:], "label": y[start:]})
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(16, 16, 3)),
      "label": tfds.features.ClassLabel(names=list(shapes.CLASS_NAMES))})
  tfds.dataset_builders.TfDataBuilder(
      name="tiny_shapes", version="1.0.0", data_dir=str(directory), features=features,
      split_datasets={"train": split(0, 40), "test": split(40, 10)}).download_and_prepare()
  return str(directory)


def test_tfds_source_train_eval_and_resume(tfds_dir, tmp_path):
  config = make_config(source="tfds:tiny_shapes", tfds_data_dir=tfds_dir, image_size=16,
                       pp_train="decode|flip_lr|value_range(-1,1)", shuffle_buffer=16)
  it = image_input.make_train_iterator(config, 0, 1)
  take(it, 2)
  it.save(str(tmp_path))
  after = take(it, 6)  # past the end of the 40 examples
  assert after[0]["image"].shape == (8, 16, 16, 3)
  fresh = image_input.make_train_iterator(config, 0, 1)
  fresh.restore(str(tmp_path))
  assert_batches_equal(take(fresh, 6), after)
  evals = image_input.eval_batches(config, 0, 1)
  assert [int(b["label_mask"].sum()) for b in evals] == [8, 2]
  _, y = shapes.load("train", 5, 50, 16)
  real = np.concatenate([b["label"][b["label_mask"] == 1] for b in evals])
  np.testing.assert_array_equal(np.sort(real), np.sort(y[40:]))  # TFDS stores its own order
  assert_batches_equal(evals, image_input.eval_batches(config, 0, 1))
  assert image_input.class_names(config) == shapes.CLASS_NAMES


@pytest.mark.parametrize("fields, message", [
    (dict(image_feature="img"), r"data.image_feature='img': dataset 'tiny_shapes' has features "
                                r"\['image', 'label'\]"),
    (dict(label_feature="y"), r"data.label_feature='y'"),
    (dict(eval_split="validation"), r"data.eval_split='validation'.*splits \['test', 'train'\]"),
])
def test_tfds_errors_name_the_field(tfds_dir, fields, message):
  config = make_config(source="tfds:tiny_shapes", tfds_data_dir=tfds_dir, image_size=16, **fields)
  with pytest.raises(ValueError, match=message) as error:
    image_input.make_train_iterator(config, 0, 1)
  assert "\n" not in str(error.value)


def test_tfds_labels_outside_num_classes(tfds_dir):
  config = make_config(source="tfds:tiny_shapes", tfds_data_dir=tfds_dir, image_size=16)
  config.model.num_classes = 4
  with pytest.raises(ValueError, match=r"has 10 classes but model.num_classes=4"):
    image_input.make_train_iterator(config, 0, 1)


def test_data_classes_keeps_every_per_example_array_in_step():
  """data.classes picks classes of an in-memory set, relabelled in the order named; every
  per-example array goes with its labels (an audio set's sample rates too)."""
  from foundation.data import audio_input  # pylint: disable=g-import-not-at-top
  from foundation.data import class_folders  # pylint: disable=g-import-not-at-top
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  sounds = audio_input.AudioSet(np.arange(6) * 10, np.arange(6) + 100, labels, ("a", "b", "c"),
                                "x")
  picked = class_folders.only_classes(sounds, "c,a", "files")
  assert picked.raw.tolist() == [0, 20, 30, 50] and picked.rates.tolist() == [100, 102, 103, 105]
  assert picked.labels.tolist() == [1, 0, 1, 0] and picked.class_names == ("c", "a")
  images = image_input.ImageSet(np.arange(6), labels, ("a", "b", "c"), "y")
  assert class_folders.only_classes(images, "b", "files").raw.tolist() == [1, 4]
  with pytest.raises(ValueError, match=r"'d' is not a class of the source \(its classes: a, b, c\)"):
    class_folders.only_classes(images, "a,d", "files")
