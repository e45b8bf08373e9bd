"""Shared pieces of the experiment configs: argument parsing and the default groups.

A config file's `get_config(arg)` receives the text after the colon in
`--config configs/lm.py:size=tiny,quick`. `parse_arg` turns it into a dict:
`key=value` pairs become strings, bare words become `True`.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses 'size=tiny,quick' into {'size': 'tiny', 'quick': True} over `defaults`."""
  parsed = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"config argument '{key}' is unknown; known arguments: {sorted(defaults)} "
          f"(example: --config configs/lm.py:size=tiny,quick)")
    parsed[key] = value.strip() if eq else True
  return parsed


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh degrees. In-slice (ici) degrees and their across-slice `dcn_` twins; -1 fills the rest."""
  return ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, tensor=1,
      dcn_data=-1, dcn_fsdp=1, dcn_tensor=1,
      # Logical axis name -> mesh axes. Changing a parallelism layout is a flag, not a code change.
      rules=(
          ("batch", ("data", "fsdp")),
          ("length", None),
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
      # or 'synthetic' (random tokens, for benchmarks on machines without TensorFlow).
      source="embedded",
      tfds_data_dir="",       # where TFDS datasets are prepared; '' means TFDS's default
      train_split="train",    # TFDS split names
      eval_split="validation",
      text_feature="text",    # the TFDS feature holding the text
      eval_fraction=0.02,     # for file sources: share of files held out for eval (by name hash)
      tokenizer="byte",       # 'byte' or the path of a SentencePiece .model file
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


def log_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every=10,               # console / TensorBoard / metrics.jsonl every N steps
      prompt="def fibonacci(n):\n",
      generate_tokens=120,    # greedy continuation printed at the end; 0 disables it
      peak_tflops=0.0,        # per-device peak for MFU; 0 means look it up from the device kind
  ))
