"""Weighted mixtures of sources: parsing, a fixed smooth interleave, and exact positions in it.

  --config.data.mixture='tfds:c4/en:0.8,files:/data/*.txt:0.2'     (SOURCE:WEIGHT, comma-separated)

A mixture draws packed rows (seq_len tokens each, so weights are shares of tokens) from its sources
in a fixed periodic order: the weights are rounded to counts c_k of PERIOD slots (largest
remainder), and smooth weighted round-robin spreads each source's slots evenly over the period.
Why not random sampling (tf.data's sample_from_datasets)? With a fixed order the realised share of
every source equals its weight to within one row at every step instead of drifting, and position q
of the order maps by arithmetic to (source k, row number within source k) — so a mixture's
position is one integer, which is what lets prepared data resume on any number of hosts.

No TensorFlow here except inside `choose` (the synthetic and prepared paths run without it).
"""

import functools
import math

import numpy as np

from foundation.data import sources

PERIOD = 10_000  # slots per period: weights are honoured to 1/PERIOD


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """'a:0.8,b:/x/*.txt:0.2' -> [('a', 0.8), ('b:/x/*.txt', 0.2)]: the weight follows the last colon.

  Raises ValueError for a missing, non-numeric or negative weight, or weights summing to zero.
  """
  parts = [p.strip() for p in text.split(",") if p.strip()]
  if not parts:
    raise ValueError(f"data.mixture={text!r} names no source; use 'SOURCE:WEIGHT,SOURCE:WEIGHT'")
  result = []
  for part in parts:
    spec, _, weight = part.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = None
    if not spec or value is None or not math.isfinite(value):
      raise ValueError(f"data.mixture={text!r}: {part!r} needs a weight after its last colon, "
                       f"e.g. 'files:/data/*.txt:0.2'")
    if value < 0:
      raise ValueError(f"data.mixture={text!r}: the weight of {spec!r} is {value}, negative; "
                       f"weights must be >= 0")
    result.append((spec, value))
  total = sum(w for _, w in result)
  if total <= 0:
    raise ValueError(f"data.mixture={text!r}: the weights sum to {total}; at least one must be "
                     f"positive")
  return result


def config_sources(config) -> list[sources.Source]:
  """The sources of a run with their normalised weights: data.mixture when set, else data.source.

  Zero-weight sources are left out (never read).
  """
  if not config.data.mixture:
    return [sources.parse_source(config.data.source)]
  parsed = parse_mixture(config.data.mixture)
  total = sum(w for _, w in parsed)
  result = []
  for spec, weight in parsed:
    if weight == 0:
      continue
    source = sources.parse_source(spec, where=f"data.mixture source {spec!r}")
    if source.kind == "synthetic":
      raise ValueError(f"data.mixture={config.data.mixture!r}: 'synthetic' cannot be mixed; use it "
                       f"alone as data.source")
    result.append(sources.Source(spec, source.kind, source.arg, weight / total, source.where))
  kinds = {s.kind == "prepared" for s in result}
  if len(kinds) > 1:
    raise ValueError(f"data.mixture={config.data.mixture!r} mixes prepared and on-the-fly sources; "
                     f"prepare them all (python -m foundation.data.prepare) or none")
  return result


def slot_counts(weights) -> np.ndarray:
  """Integer slots per source out of PERIOD, proportional to `weights` (largest remainder).

  Every positive weight gets at least one slot, so no source is silently dropped.
  """
  weights = np.asarray(weights, np.float64)
  exact = weights / weights.sum() * PERIOD
  counts = np.maximum(np.floor(exact).astype(np.int64), 1)
  order = np.argsort(-(exact - np.floor(exact)), kind="stable")
  i = 0
  while counts.sum() < PERIOD:
    counts[order[i % len(order)]] += 1
    i += 1
  while counts.sum() > PERIOD:  # only when many tiny weights were raised to 1
    counts[np.argmax(counts)] -= 1
  return counts


@functools.lru_cache(maxsize=16)
def _schedule(counts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(pattern, occurrence): pattern[j] is the source of slot j of a period (smooth weighted
  round-robin), occurrence[j] how many slots of that source come before j in the period."""
  current = np.zeros(len(counts), np.int64)
  steps = np.asarray(counts, np.int64)
  pattern = np.empty(PERIOD, np.int64)
  occurrence = np.empty(PERIOD, np.int64)
  seen = np.zeros(len(counts), np.int64)
  for j in range(PERIOD):
    current += steps
    k = int(np.argmax(current))
    current[k] -= PERIOD
    pattern[j], occurrence[j] = k, seen[k]
    seen[k] += 1
  return pattern, occurrence


def pattern(counts) -> np.ndarray:
  """int64 [PERIOD]: which source fills each slot of the periodic order."""
  return _schedule(tuple(int(c) for c in counts))[0]


def locate(positions, counts) -> tuple[np.ndarray, np.ndarray]:
  """Positions in the mixed order -> (source index, row number within that source)."""
  positions = np.asarray(positions, np.int64)
  order, occurrence = _schedule(tuple(int(c) for c in counts))
  slot = positions % PERIOD
  source = order[slot]
  return source, (positions // PERIOD) * np.asarray(counts, np.int64)[source] + occurrence[slot]


def rows_before(position: int, counts) -> np.ndarray:
  """int64 [num_sources]: how many of the first `position` rows of the order come from each."""
  order, _ = _schedule(tuple(int(c) for c in counts))
  full, rest = divmod(int(position), PERIOD)
  return full * np.asarray(counts, np.int64) + np.bincount(order[:rest], minlength=len(counts))


def choose(datasets: list, counts):
  """tf.data: the elements of `datasets` in the periodic order (stops when one runs out)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if len(datasets) == 1:
    return datasets[0]
  choice = tf.data.Dataset.from_tensor_slices(pattern(counts)).repeat()
  return tf.data.Dataset.choose_from_datasets(datasets, choice, stop_on_empty_dataset=True)


def tags(source_list) -> list[str]:
  """Metric-name-safe, distinct labels: 'files:/data/web/*.txt' -> 'files_data_web_txt'. Long
  ones keep their end (the distinctive part of a path); repeats get their index appended."""
  labels = []
  for i, source in enumerate(source_list):
    keep = "".join(c if c.isalnum() or c in ".-" else "_" for c in source.spec)
    label = "_".join(p for p in keep.split("_") if p)
    label = label if len(label) <= 40 else label[:12] + "_" + label[-27:]
    labels.append(f"{label}_{i}" if label in labels else label)
  return labels


def shares(source_list, rows) -> dict[str, float]:
  """{'data/<tag>': share of the rows} for rows drawn per source."""
  total = max(int(sum(rows)), 1)
  return {f"data/{t}": float(r) / total for t, r in zip(tags(source_list), rows)}
