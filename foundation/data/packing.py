"""Packing: documents -> fixed-length rows by concatenate-and-chunk, in checkpointable tf.data ops.

Each document becomes ids = [bos] + encode(doc) + [eos], split into the next-token pair
inputs = ids[:-1], targets = ids[1:], plus a `starts` flag on the document's first token. The
document streams are concatenated and cut into rows of seq_len (`Dataset.rebatch`: one copy, and
16x faster than unbatch().batch() on tokens). Every token lands in exactly one row, nothing is
padded, and the iterator position is a few integers, so resuming is exact.

After rows are shuffled and batched, `finish_batch` turns `starts` into the model's view:
segment_ids 1, 2, 3, … per document piece in a row (a row that begins mid-document begins a
segment too) and positions counting from 0 at each row start and each document start.
"""


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


def tokenize_documents(documents, tokenizer):
  """tf.string documents -> per-document {inputs, targets: int32 [n+1], starts: bool [n+1]}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return documents.map(
      lambda text: _document_to_pairs(tokenizer.tf_encode(text), tokenizer.bos_id,
                                      tokenizer.eos_id),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def pack_rows(documents, tokenizer, seq_len: int):
  """tf.string documents -> rows {inputs, targets: int32 [seq_len], starts: bool [seq_len]}.

  A finite input drops the incomplete last row; every other token appears exactly once.
  """
  return tokenize_documents(documents, tokenizer).rebatch(seq_len, drop_remainder=True)


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
