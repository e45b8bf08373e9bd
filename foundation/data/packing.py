"""Packing: documents -> fixed-length rows by concatenate-and-chunk, in checkpointable tf.data ops.

Each document becomes ids = [bos] + encode(doc) + [eos], split into the next-token pair
inputs = ids[:-1], targets = ids[1:], plus a `starts` flag on the document's first token. The
document streams are concatenated and cut into rows of seq_len (`Dataset.rebatch`: one copy, and
16x faster than unbatch().batch() on tokens). Every token lands in exactly one row, nothing is
padded, and the iterator position is a few integers, so resuming is exact.

After rows are shuffled and batched, `finish_batch` turns `starts` into the model's view:
segment_ids 1, 2, 3, … per document piece in a row (a row that begins mid-document begins a
segment too) and positions counting from 0 at each row start and each document start.
`finish_rows` is the same in numpy, for prepared data and eval rows; it also takes a mask of real
tokens: padding gets segment id 0 (the model's padding id), position 0 and loss_mask 0.

Prepared data stores only the stream of inputs ([bos] + ids per document, one bos after the last):
the target of a token is the next input, or eos where the next input is a bos. `stream_rows` turns
windows of seq_len + 1 stream tokens back into rows.
"""

import numpy as np


def _document_to_pairs(ids, bos_id: int, eos_id: int) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Two concats rather than slices of [bos] + ids + [eos]: slices alias one buffer, which makes
  # rebatch log "Tensor RefCount not reliable" errors for every long document.
  return {
      "inputs": tf.concat([[bos_id], ids], axis=0),
      "targets": tf.concat([ids, [eos_id]], axis=0),
      # bool keeps the shuffle buffer (and its checkpoint) small.
      "starts": tf.range(tf.shape(ids)[0] + 1) == 0,
  }


# Documents per call of a tokenizer that runs in Python (SentencePiece): a tf.py_function call
# costs more than encoding a short document, so short documents go in batches.
ENCODE_BATCH = 64


def encode_batch(tokenizer, texts):
  """tf.string [n] -> int32 RaggedTensor [n, None] of each text's ids (no bos/eos)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if hasattr(tokenizer, "tf_encode_batch"):
    return tokenizer.tf_encode_batch(texts)
  return tf.map_fn(tokenizer.tf_encode, texts,
                   fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))


def tokenize_documents(documents, tokenizer):
  """tf.string documents -> per-document {inputs, targets: int32 [n+1], starts: bool [n+1]}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pairs = lambda ids: _document_to_pairs(ids, tokenizer.bos_id, tokenizer.eos_id)  # noqa: E731
  if hasattr(tokenizer, "tf_encode_batch"):
    ids = documents.batch(ENCODE_BATCH).map(
        tokenizer.tf_encode_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ids.unbatch().map(pairs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return documents.map(lambda text: pairs(tokenizer.tf_encode(text)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def pack_rows(documents, tokenizer, seq_len: int, drop_remainder: bool = True):
  """tf.string documents -> rows {inputs, targets: int32 [seq_len], starts: bool [seq_len]}.

  A finite input drops (or with drop_remainder=False, keeps short) the incomplete last row; every
  other token appears exactly once.
  """
  return tokenize_documents(documents, tokenizer).rebatch(seq_len, drop_remainder=drop_remainder)


def finish_batch(rows: dict) -> dict:
  """Rows {inputs, targets, starts} [B, L] -> the model batch, all int32 [B, L]:
  inputs, targets, segment_ids (1-based per document piece), positions, loss_mask (all 1)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  starts = rows["starts"]
  batch, length = tf.shape(starts)[0], tf.shape(starts)[1]
  # A row always opens a segment: attention never reaches back into the previous row.
  starts = tf.concat([tf.ones_like(starts[:, :1]), starts[:, 1:]], axis=1)
  segment_ids = tf.cumsum(tf.cast(starts, tf.int32), axis=1)
  columns = tf.broadcast_to(tf.range(length)[None, :], [batch, length])
  # Position = column - the column where this token's segment starts. Number the segments of all
  # rows uniquely, take each one's first column with a segment-min, and gather it back.
  unique_segment = (segment_ids - 1) + tf.range(batch)[:, None] * length
  first_column = tf.math.unsorted_segment_min(
      tf.reshape(columns, [-1]), tf.reshape(unique_segment, [-1]), batch * length)
  positions = columns - tf.gather(first_column, unique_segment)
  return {
      "inputs": rows["inputs"],
      "targets": rows["targets"],
      "segment_ids": segment_ids,
      "positions": positions,
      # Concatenate-and-chunk has no padding: every token is a real next-token target.
      "loss_mask": tf.ones_like(segment_ids),
  }


def finish_rows(inputs: np.ndarray, targets: np.ndarray, starts: np.ndarray,
                real: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """numpy twin of finish_batch: [B, L] rows -> the model batch, all int32 [B, L].

  real: bool [B, L], False on padding (default: all real). Padding has segment id 0 (the model's
  padding id), position 0 and loss_mask 0.
  """
  length = inputs.shape[1]
  starts = starts.astype(bool, copy=True)
  starts[:, 0] = True
  segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
  columns = np.arange(length, dtype=np.int32)
  positions = columns - np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
  if real is None:
    loss_mask = np.ones_like(segment_ids)
  else:
    loss_mask = real.astype(np.int32)
    segment_ids *= loss_mask
    positions *= loss_mask
  return {"inputs": inputs.astype(np.int32, copy=False),
          "targets": targets.astype(np.int32, copy=False),
          "segment_ids": segment_ids, "positions": positions.astype(np.int32, copy=False),
          "loss_mask": loss_mask}


def stream_rows(windows: np.ndarray, bos_id: int, eos_id: int) -> dict[str, np.ndarray]:
  """Windows [B, L + 1] of a prepared input stream -> rows {inputs, targets, starts} [B, L]."""
  inputs, following = windows[:, :-1], windows[:, 1:]
  targets = np.where(following == bos_id, eos_id, following)
  return {"inputs": inputs, "targets": targets, "starts": inputs == bos_id}


def pad_rows(rows: list[dict[str, np.ndarray]], seq_len: int,
             total: int) -> dict[str, np.ndarray]:
  """Rows {inputs, targets, starts} of seq_len or fewer tokens -> the model batch of `total` rows
  [total, seq_len]: short rows and missing rows are padding (loss_mask 0)."""
  inputs = np.zeros((total, seq_len), np.int32)
  targets = np.zeros((total, seq_len), np.int32)
  starts = np.zeros((total, seq_len), bool)
  real = np.zeros((total, seq_len), bool)
  for i, row in enumerate(rows):
    n = len(row["inputs"])
    inputs[i, :n], targets[i, :n], starts[i, :n], real[i, :n] = (
        row["inputs"], row["targets"], row["starts"], True)
  return finish_rows(inputs, targets, starts, real)
