"""Test set-up: 8 simulated CPU devices, so sharding is exercised for real on any machine."""

import os
import sys

# Must happen before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never grab an accelerator
# JAX's persistent compilation cache, shared by the test workers and the trainer processes the
# tests start: most of those are the size=test model's same few programs, and each would
# otherwise compile them again (about 5 of a run's 16 seconds). A hit is the executable a miss
# would have built; keys include the JAX version, flags and device count.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The slowest files first, then the rest by their number of tests (xdist's own order, which
# pytest.ini turns off so that this one holds). With `-n 2` each file runs whole on one worker
# (--dist loadfile) and xdist hands files out in this order as workers come free: a slow file handed
# out last would run on alone while the other worker idles. Slowest first, as a cold-cache
# `pytest -n 2` run on a 2-core CPU measured them (from about 6 minutes down to 1).
SLOW_FILES_FIRST = (
    "test_notebook.py", "test_faults.py", "test_sharding.py", "test_vit_train.py",
    "test_multihost.py", "test_vlm.py", "test_faults_multihost.py", "test_audio_train.py",
    "test_image_text.py", "test_finetune_train.py", "test_reliability.py", "test_serve.py",
    "test_train.py", "test_vit.py", "test_bench.py", "test_memory.py", "test_compile.py",
    "test_finetuned_use.py", "test_watch.py", "test_data_resume.py", "test_model.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  first, count = {}, {}
  for i, item in enumerate(items):
    first.setdefault(item.path.name, i)
    count[item.path.name] = count.get(item.path.name, 0) + 1
  # A stable sort: each file's tests stay together and in their order (module fixtures, and tests
  # that must come last in their file, rely on it).
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path.name],
                               first[item.path.name]))
