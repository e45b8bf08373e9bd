"""tf.data input for pre-training: sources, tokenizers, packing, per-host batches, exact resume.

  tok = data.make_tokenizer(config.data.tokenizer)          # 'byte' or a SentencePiece .model path
  it = data.make_train_iterator(config, process_index, process_count)
  batch = next(it)   # int32 [batch_size // process_count, seq_len]:
                     #   inputs, targets, segment_ids, positions, loss_mask
  it.save(directory); it.restore(directory)                # this process's position only
  evals = data.make_eval_batches(config, process_index, process_count)   # config.eval.steps batches

Importing this package does not import TensorFlow (the synthetic source runs without it).
"""

from foundation.data.iterators import DataIterator
from foundation.data.pipeline import host_batch_size
from foundation.data.pipeline import make_eval_batches
from foundation.data.pipeline import make_train_iterator
from foundation.data.tokenizers import ByteTokenizer
from foundation.data.tokenizers import check_vocab_size
from foundation.data.tokenizers import make_tokenizer
from foundation.data.tokenizers import SentencePieceTokenizer
from foundation.data.tokenizers import Tokenizer
