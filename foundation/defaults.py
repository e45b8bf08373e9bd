"""The default groups of a run config: mesh, optimizer, data, checkpoints, evaluation, guard, logs.

Config files (configs/*.py, through configs/common.py) start from these; the library uses them to
complete a workdir's config.json written before a field existed and to make the config of an
imported model. Every field is a command-line flag: --config.<group>.<field>=value.
"""

import ml_collections


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh degrees. In-slice (ici) degrees and their across-slice `dcn_` twins; -1 fills the rest.

  data: plain data parallelism (params replicated); fsdp: data parallelism with params, grads and
  optimizer state split (ZeRO-3); sequence: activations split along the sequence (context
  parallelism); tensor: heads and MLP width split (Megatron-style).
  """
  return ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, sequence=1, tensor=1,
      dcn_data=-1, dcn_fsdp=1, dcn_sequence=1, dcn_tensor=1,
      # ZeRO-1: also split the optimizer state over `data` (params stay replicated there).
      zero1=False,
      # Logical axis name -> mesh axes. Changing a parallelism layout is a flag, not a code change.
      rules=(
          ("batch", ("data", "fsdp")),
          ("length", "sequence"),
          ("embed", "fsdp"),
          ("heads", "tensor"),
          ("kv_heads", "tensor"),
          ("head_dim", None),
          ("mlp", "tensor"),
          ("vocab", "tensor"),
          ("layers", None),
          # Activation names: the residual stream's embed dim is not sharded (it is what fsdp
          # gathers weights for), the attention/MLP activations follow their weights.
          ("act_embed", None),
          ("act_heads", "tensor"),
          ("act_kv_heads", "tensor"),
          ("act_mlp", "tensor"),
          ("act_vocab", "tensor"),
      ),
  ))


def optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=3e-4,               # peak learning rate, reached after warmup
      warmup_steps=100,
      decay_steps=-1,        # cosine decay length; -1 means `steps`
      min_lr_ratio=0.1,      # the floor of the cosine, as a fraction of `lr`
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,
      decay_norms=False,     # apply weight decay to RMSNorm scales
      decay_embeddings=False,  # apply weight decay to the token embedding table
      clip_norm=1.0,         # global-norm clipping; 0 disables it
      z_loss=0.0,            # weight of the log(Z)^2 auxiliary loss (PaLM); 0 disables it
  ))


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # 'embedded' (the Python standard library's .py sources), 'files:GLOB', 'tfds:NAME',
      # 'prepared:DIR' (written by python -m foundation.data.prepare), or 'synthetic' (random
      # tokens, for benchmarks on machines without TensorFlow).
      source="embedded",
      # A weighted mixture instead of `source`: 'SOURCE:WEIGHT,SOURCE:WEIGHT', e.g.
      # 'tfds:c4/en:0.8,files:/data/*.txt:0.2' (weights are shares of tokens; '' uses `source`).
      mixture="",
      tfds_data_dir="",       # where TFDS datasets are prepared; '' means TFDS's default
      train_split="train",    # TFDS split names
      eval_split="validation",
      # files: 'auto' (by extension: .jsonl/.json -> jsonl, .tfrecord* -> tfrecord, else text),
      # 'text' (a file is a document), 'jsonl' (a line is), 'tfrecord' (a tf.train.Example is).
      file_format="auto",
      text_feature="text",    # the TFDS feature, JSONL field or TFRecord bytes feature of the text
      invalid_utf8="fail",    # a document that is not UTF-8: 'fail' (name it) or 'skip' (print it)
      # For file sources: the share of files held out for eval (by name hash); a single JSONL or
      # TFRecord file holds out this share of its documents instead (by text hash).
      eval_fraction=0.02,
      tokenizer="byte",       # 'byte', a SentencePiece .model file or an HF tokenizer.json
      shuffle_buffer=1024,    # packed rows
      prefetch=2,
  ))


def checkpoint_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every=200,      # save every N steps (and always at the end)
      keep=3,         # keep the last K checkpoints
      async_save=True,
  ))


def eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every=100,      # evaluate every M steps (and at step 0 and at the end); 0 disables it
      steps=8,        # eval batches per evaluation
  ))


def evaluate_config() -> ml_collections.ConfigDict:
  """Task evaluators (foundation/evaluate.py): `python -m foundation.evaluate`, or periodically in
  training. `eval.*` above is the trainer's own held-out loss."""
  return ml_collections.ConfigDict(dict(
      every=0,                 # run the tasks every N train steps; 0 disables it
      tasks="perplexity",      # comma-separated: 'perplexity', 'mc:FILE.jsonl', 'gen:FILE.jsonl'
      shots=0,                 # solved examples (from the same file) before each question
      metric="exact_match",    # generation tasks: 'exact_match' or 'bleu' (sacrebleu)
      max_new_tokens=32,       # generation tasks: the longest answer, in tokens
      limit=0,                 # at most this many examples per task; 0 means all
      batch_size=8,            # rows per batch, rounded up to the data-parallel degree
      delimiter=" ",           # between a context and its answer
      seed=0,                  # which few-shot examples
  ))


def lora_config() -> ml_collections.ConfigDict:
  """LoRA adapters, a transform of any family's params (foundation/lora.py)."""
  return ml_collections.ConfigDict(dict(
      rank=0,                  # adapter rank; 0: no adapters
      alpha=16.0,              # the update W + alpha / rank * A @ B
      # A regex searched in each kernel's module path ('layers/attn/q'): the LoRA paper's q and v;
      # '(attn|mlp)/\\w+$' adapts every projection of a block.
      targets="attn/(q|v)$",
  ))


def guard_config() -> ml_collections.ConfigDict:
  """What the train step does with bad numbers (docs/reliability.md)."""
  return ml_collections.ConfigDict(dict(
      # A step whose loss or gradients are not finite is never applied (params and optimizer state
      # stay as they were). Then: 'skip' (log it, go on) or 'stop' (exit naming the step and the
      # last good checkpoint).
      nonfinite="skip",
      max_skips_in_a_row=20,   # skipped steps in a row after which the run stops anyway
      # Skip an update whose loss is above loss_spike x the running mean of recent losses (an
      # exponential mean over about 100 steps); 0 disables the guard.
      loss_spike=0.0,
      spike_warmup=50,         # good steps before the spike guard acts
      # Fault injection (tests, drills): comma-separated steps whose gradients are made NaN.
      inject_nan_at="",
  ))


def log_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every=10,               # console / TensorBoard / metrics.jsonl every N steps
      prompt="def fibonacci(n):\n",
      generate_tokens=120,    # greedy continuation printed at the end; 0 disables it
      peak_tflops=0.0,        # per-device peak for MFU; 0 means look it up from the device kind
  ))


def run_config(steps: int, batch_size: int, lr: float) -> ml_collections.ConfigDict:
  """The fields every run has, whatever its family and task; a config file adds `model`,
  `task` and its input's `data` group (configs/vit.py is an example)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = steps
  config.batch_size = batch_size   # global, over all hosts and devices
  config.grad_accum = 1            # micro-batches per step
  config.mesh = mesh_config()
  config.optim = optim_config()
  config.optim.lr = lr
  config.optim.warmup_steps = min(2000, max(1, steps // 10))
  config.resume = "auto"           # 'auto' or 'required' (docs/reliability.md)
  config.init_from = ""            # a workdir or checkpoints/<step>: start from its params
  config.init_from_partial = False  # load the params whose names and shapes match; init the rest
  config.init_from_skip = ""       # comma-separated regexes of params to init afresh ('head/.*')
  config.lora = lora_config()      # LoRA adapters (rank 0: none)
  config.trainable = ""            # regexes of the params that train ('head/': a linear probe); '' all
  config.guard = guard_config()
  config.checkpoint = checkpoint_config()
  config.eval = eval_config()
  config.log = log_config()
  config.log.generate_tokens = 0   # only text tasks sample at the end
  return config


def completion() -> dict:
  """What a workdir's config.json written before a field existed is completed with: the default
  groups, the decoder family and the 'lm' task (the only ones there were). Model fields a family
  adds later take their dataclass defaults when the model is built."""
  return {"task": "lm", "grad_accum": 1, "resume": "auto", "init_from": "",
          "init_from_partial": False, "model": {"family": "decoder"},
          "lora": lora_config().to_dict(), "trainable": "",
          "mesh": mesh_config().to_dict(), "optim": optim_config().to_dict(),
          "data": data_config().to_dict(), "checkpoint": checkpoint_config().to_dict(),
          "eval": eval_config().to_dict(), "evaluate": evaluate_config().to_dict(),
          "guard": guard_config().to_dict(), "log": log_config().to_dict()}


def migrate(saved: dict) -> dict:
  """A config.json of an older layout in today's: LoRA was model.lora_* fields of the decoder
  (model.lora_dropout has no successor: a weight transform has no adapter input to drop)."""
  model = saved.get("model", {})
  if "lora_rank" in model:
    from foundation import lora  # pylint: disable=g-import-not-at-top
    saved["lora"] = {"rank": model.pop("lora_rank"), "alpha": model.pop("lora_alpha", 16.0),
                     "targets": lora.targets_from_names(model.pop("lora_targets", "q,v"))}
    model.pop("lora_dropout", None)
  return saved
