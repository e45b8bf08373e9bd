r"""Trains a SentencePiece tokenizer on the train split of the configured data source.

  python -m foundation.tokenizer --config configs/lm.py:size=tiny --vocab_size 1000 \
      --output runs/sp/sp.model [--config.data.source=files:corpus/*.txt] [--max_docs 5000]

then train with it: --config.data.tokenizer=runs/sp/sp.model (and model.vocab_size >= its size).
The model uses foundation's id layout (pad=0, bos=1, eos=2, unk=3), falls back to UTF-8 bytes for
anything it has no piece for, and keeps text exactly (no normalisation, whitespace kept), so
decode(encode(text)) == text, indentation of code included.
"""

import io
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from foundation.data import documents
from foundation.data import tokenizers

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a command, so that importing this module
  (tests, notebooks) never collides with another command's --config."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_integer("vocab_size", 1000, "Pieces in the trained model, specials and the 256 "
                       "byte pieces included.")
  flags.DEFINE_string("output", None, "Where to write the .model file.", required=True)
  flags.DEFINE_integer("max_docs", 100_000, "Train on at most this many documents (0: all).")
  flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece algorithm.")


# Sentences (lines) SentencePiece samples from the documents: bounds the trainer's memory.
_MAX_SENTENCES = 2_000_000
_MAX_SENTENCE_BYTES = 16_384


def document_lines(documents):
  """SentencePiece learns from lines: yields each document's non-blank lines."""
  for document in documents:
    for line in document.splitlines():
      if line.strip():
        yield line


def train_sentencepiece(documents, vocab_size: int, model_type: str = "unigram") -> bytes:
  """Trains on an iterable of strings; returns the serialised model (pad=0, bos=1, eos=2, unk=3)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=document_lines(documents),
      model_writer=model,
      vocab_size=vocab_size,
      # A small corpus may not support the requested size: a smaller model beats an error.
      hard_vocab_limit=False,
      model_type=model_type,
      pad_id=tokenizers.PAD_ID, bos_id=tokenizers.BOS_ID, eos_id=tokenizers.EOS_ID, unk_id=3,
      byte_fallback=True,          # unseen characters become byte pieces, never <unk>
      character_coverage=0.9995,
      normalization_rule_name="identity",  # decode(encode(x)) == x
      remove_extra_whitespaces=False,      # indentation is meaning in code
      allow_whitespace_only_pieces=True,
      split_digits=True,
      input_sentence_size=_MAX_SENTENCES,
      shuffle_input_sentence=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      num_threads=os.cpu_count() or 1,
      minloglevel=1,
  )
  return model.getvalue()


def _write(path: str, data: bytes) -> None:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def main(argv) -> None:
  del argv
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/lm.py:size=tiny")
  texts = documents.iterate_train_documents(config, FLAGS.max_docs)
  model = train_sentencepiece(texts, FLAGS.vocab_size, FLAGS.model_type)
  _write(FLAGS.output, model)
  vocab_size = tokenizers.SentencePieceTokenizer(model, FLAGS.output).vocab_size
  print(f"wrote {FLAGS.output} (vocab_size={vocab_size}, source={config.data.source!r}); "
        f"use it with --config.data.tokenizer={FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
