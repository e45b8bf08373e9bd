r"""Fine-tuning a pre-trained LM: SFT on chat records, or a sequence-classification head; full or
LoRA. Everything else (model sizes, mesh, optimizer, checkpoints) is configs/lm.py's.

SFT of the laptop demo's checkpoint (train it first: configs/lm.py's docstring) on JSONL chat
records -- {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} a line:
  python -m foundation.train --config configs/finetune.py:task=sft,base=tiny --workdir runs/sft \
      --config.init_from=runs/tiny --config.sft.train_path=data/chat.jsonl

The same with LoRA adapters (rank 8 on every projection; only the adapters train):
  python -m foundation.train --config configs/finetune.py:task=sft,base=tiny,lora \
      --workdir runs/sft_lora --config.init_from=runs/tiny \
      --config.sft.train_path=data/chat.jsonl

A classification head on the pooled last token, from a CSV with text,label columns (or JSONL,
or a prepared TFDS dataset such as 'tfds:imdb_reviews'):
  python -m foundation.train --config configs/finetune.py:task=classify,base=tiny \
      --workdir runs/cls --config.init_from=runs/tiny \
      --config.classify.train_path=data/reviews.csv --config.model.num_classes=2

An imported Hugging Face model (python -m foundation.hf import ... --workdir runs/llama1b) or any
other workdir: `base=` names it, and its config.json gives the model, seq_len and tokenizer:
  python -m foundation.train --config configs/finetune.py:task=sft,base=runs/llama1b,lora \
      --workdir runs/llama1b_sft --config.sft.train_path=data/chat.jsonl

Arguments after the colon: `task=` sft or classify; `base=` a configs/lm.py size (the shape of the
checkpoint in init_from) or a workdir (its model, seq_len and data.tokenizer; init_from is that
workdir); `lora` adds adapters; `quick` shortens the run. init_from='' trains from scratch (the
baseline a fine-tuning run should beat).
"""

import os

import ml_collections

from configs import common
from configs import lm

TASKS = ("sft", "classify")


def sft_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      train_path="",          # JSONL file or glob of chat records (see foundation/data/sft.py)
      eval_path="",           # '' holds out eval_fraction of train_path's records by hash
      eval_fraction=0.05,
      # An example longer than seq_len: 'truncate' cuts its answer, 'error' stops. A prompt that
      # leaves no room for an answer token is always an error.
      overlong="truncate",
  ))


def classify_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # A CSV or JSONL file or glob, or 'tfds:NAME' (prepared, under data.tfds_data_dir).
      train_path="",
      eval_path="",           # '' : files hold out eval_fraction by hash; TFDS reads eval_split
      eval_fraction=0.1,
      train_split="train",    # TFDS split names
      eval_split="test",
      text_field="text",      # the CSV column, JSON field or TFDS feature of the text
      label_field="label",    # ... and of the label (an int id or a string name)
      labels="",              # 'neg,pos' fixes names and ids; '' takes them from the data
      truncate="right",       # a long text loses its end ('right') or its start ('left')
  ))


def base_config(base: str, quick: bool) -> tuple[ml_collections.ConfigDict, str]:
  """(configs/lm.py's config for `base`, the init_from it implies). A size name gives that size
  (init_from left for the command line); a workdir gives configs/lm.py's run for the workdir's
  size with its model fields, seq_len and tokenizer, and init_from the workdir."""
  quick_arg = ",quick" if quick else ""
  if base in lm.SIZES:
    return lm.get_config(f"size={base}{quick_arg}"), ""
  if not os.path.isfile(os.path.join(base, "config.json")):
    raise ValueError(f"config argument base={base!r} is neither a configs/lm.py size "
                     f"({', '.join(lm.SIZES)}) nor a workdir with a config.json")
  from foundation import generate  # pylint: disable=g-import-not-at-top
  saved = generate.load_config(base)  # its config.json over today's defaults for its size
  config = lm.get_config(f"size={saved.size}{quick_arg}")
  with config.unlocked():
    # The base model's fields. Its own adapters or head (a fine-tuned base) are not carried over:
    # this run chooses its own.
    config.model.update({k: v for k, v in saved.model.items() if k != "num_classes"})
    config.seq_len = min(saved.seq_len, config.model.max_seq_len)
    config.data.tokenizer = saved.data.tokenizer
  return config, base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, task="sft", base="tiny", lora=False, quick=False)
  if args["task"] not in TASKS:
    raise ValueError(f"config argument task={args['task']!r} is unknown; tasks: {', '.join(TASKS)}")
  config, init_from = base_config(args["base"], args["quick"])
  with config.unlocked():
    config.task = args["task"]
    # A checkpoint workdir (or checkpoint folder) whose params start the run; a new optimizer.
    config.init_from = init_from
    config.sft = sft_config()
    config.classify = classify_config()
    # Fine-tuning moves a trained model a little: a smaller peak lr, a short warmup, few steps.
    config.steps = 20 if args["quick"] else 300
    config.optim.lr = 1e-3 if args["lora"] else 3e-4
    config.optim.warmup_steps = 5 if args["quick"] else 20
    config.optim.weight_decay = 0.0 if args["lora"] else config.optim.weight_decay
    config.log.generate_tokens = 0   # the LM sample prompt means nothing to a fine-tuned model
    if args["task"] == "classify":
      config.model.num_classes = 2
      config.seq_len = min(config.seq_len, 256)
      # 1b and up default to accumulating micro-batches and chunking vocabulary logits: the
      # classifier step takes its batch whole, and its logits are over the classes.
      config.grad_accum, config.model.logits_chunk = 1, 0
    if args["lora"]:
      config.lora.rank = 8
      config.lora.alpha = 16.0
      # Every projection, not the LoRA paper's q,v: on the demo (benchmarks/finetune_demo.py)
      # q,v adapters reach SFT eval loss 0.78, all projections 0.35, full fine-tuning 0.28;
      # QLoRA (Dettmers et al., 2023) reports adapters on all linear layers are needed to match
      # full fine-tuning.
      config.lora.targets = r"(attn|mlp)/\w+$"
  return config.lock()
