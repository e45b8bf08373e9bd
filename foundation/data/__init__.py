"""tf.data input for pre-training: sources, mixtures, tokenizers, packing, prepared shards,
per-host batches, exact resume.

  tok = data.make_tokenizer(config.data.tokenizer)          # 'byte', a SentencePiece .model, a tokenizer.json
  it = data.make_train_iterator(config, process_index, process_count)
  batch = next(it)   # int32 [batch_size // process_count, seq_len]:
                     #   inputs, targets, segment_ids, positions, loss_mask
  it.save(directory); it.restore(directory)                # this process's position only
  it.description(); it.metrics()                           # for checkpoint metadata; mixture shares
  data.check_resume(saved_description, it.description(), step)   # before restoring a checkpoint
  evals = data.make_eval_batches(config, process_index, process_count)   # <= config.eval.steps

  Fine-tuning (in-memory example sets, numpy only; the same iterator interface):
  it = data.make_sft_iterator(config, process_index, process_count)       # config.sft.*
  evals = data.make_sft_eval_batches(config, process_index, process_count)
  it = data.make_classify_iterator(config, process_index, process_count)  # config.classify.*
  evals = data.make_classify_eval_batches(config, process_index, process_count)
    # classification batches: inputs, positions, segment_ids [b, L]; labels, last_index,
    # label_mask [b]

  python -m foundation.data.prepare ...   # tokenize once into shards: data.source=prepared:DIR
  python -m foundation.data.bench ...     # tokens/s per host for each stage

Importing this package does not import TensorFlow (the synthetic and prepared sources run
without it).
"""

from foundation.data.classify import make_classify_eval_batches
from foundation.data.classify import make_classify_iterator
from foundation.data.iterators import check_resume
from foundation.data.iterators import DataIterator
from foundation.data.pipeline import host_batch_size
from foundation.data.pipeline import make_eval_batches
from foundation.data.pipeline import make_train_iterator
from foundation.data.pipeline import summary
from foundation.data.sft import chat_prompt_ids
from foundation.data.sft import make_sft_eval_batches
from foundation.data.sft import make_sft_iterator
from foundation.data.tokenizers import ByteTokenizer
from foundation.data.tokenizers import check_vocab_size
from foundation.data.tokenizers import fingerprint as tokenizer_fingerprint
from foundation.data.tokenizers import make_tokenizer
from foundation.data.tokenizers import SentencePieceTokenizer
from foundation.data.tokenizers import store_tokenizer
from foundation.data.tokenizers import Tokenizer
