r"""Decoder-only language models with LLaMA-family shapes.

The laptop demo (a few minutes on a CPU, the embedded corpus):
  python -m foundation.train --config configs/lm.py:size=tiny --workdir runs/tiny

A 1B model on a GPU host with a prepared TFDS dataset:
  python -m foundation.train --config configs/lm.py:size=1b --workdir runs/1b \
      --config.data.source=tfds:c4/en --config.mesh.fsdp=-1

Arguments after the colon: `size=` one of SIZES; `quick` shortens the run (few steps, tiny evals) to
check that everything works end to end. Every field below can be overridden with --config.a.b=value.
"""

import ml_collections

from configs import common

# name: (d_model, n_layers, n_heads, n_kv_heads, mlp_dim, vocab_size, max_seq_len, rope_theta, tied)
SIZES = {
    # The smallest model that exercises every code path (GQA, tied embeddings off, several layers).
    "test": (64, 2, 4, 2, 128, 384, 128, 10_000.0, False),
    # The laptop demo: about 1M parameters, byte-level vocabulary padded to a multiple of 128.
    "tiny": (128, 4, 4, 2, 384, 384, 512, 10_000.0, False),
    # GPT-2-small-like and GPT-2-medium-like widths with LLaMA blocks.
    "125m": (768, 12, 12, 12, 2048, 32_000, 2048, 10_000.0, False),
    "350m": (1024, 24, 16, 16, 2816, 32_000, 2048, 10_000.0, False),
    # LLaMA-3.2-1B / 3B shapes.
    "1b": (2048, 16, 32, 8, 8192, 128_256, 8192, 500_000.0, True),
    "3b": (3072, 28, 24, 8, 8192, 128_256, 8192, 500_000.0, True),
    # LLaMA-2-7B / 13B / 70B shapes.
    "7b": (4096, 32, 32, 32, 11008, 32_000, 4096, 10_000.0, False),
    "13b": (5120, 40, 40, 40, 13824, 32_000, 4096, 10_000.0, False),
    "70b": (8192, 80, 64, 8, 28672, 32_000, 4096, 10_000.0, False),
}

# name: (global batch_size, seq_len, steps, peak lr)
RUNS = {
    "test": (16, 32, 20, 3e-3),
    "tiny": (8, 256, 400, 5e-3),   # about 3 minutes on a 2-core CPU
    "125m": (256, 1024, 20_000, 6e-4),
    "350m": (256, 2048, 40_000, 3e-4),
    "1b": (256, 2048, 100_000, 3e-4),
    "3b": (512, 2048, 100_000, 3e-4),
    "7b": (1024, 4096, 250_000, 3e-4),
    "13b": (1024, 4096, 250_000, 3e-4),
    "70b": (1024, 4096, 500_000, 1.5e-4),
}

# The large sizes' defaults are chosen to start on the smallest slice docs/scaling.md names for
# each (the fewest chips, and of those the least HBM per chip), checked with
#   python -m foundation.compile --config configs/lm.py:size=NAME --topology SLICE
# and recorded in benchmarks/results/fit-NAME.json; tests/test_compile.py fails when a default here
# and its recorded fit disagree. The global batch of RUNS is kept: it is split into grad_accum
# micro-batches, each small enough for the chip, rather than shrunk, so that the tokens per
# optimizer step (for which lr and steps were chosen) stay the same. Remat 'full' and chunked
# logits buy the room for those micro-batches. Per-chip totals are the compiler's, measured.
# name: (smallest slice, remat_policy, grad_accum, logits_chunk, mesh.fsdp, mesh.tensor)
FIT_DEFAULTS = {
    # 256 x 2048 as 4 micro-batches of 64 rows (8 per chip); the 128k-vocabulary logits in chunks.
    # 16.78 of 32 GiB per chip.
    "1b": ("v4:2x2x2", "full", 4, 256, -1, 1),
    # 512 x 2048 as 16 micro-batches of 32 rows (4 per chip): 17.80 of 32 GiB per chip.
    "3b": ("v4:2x2x2", "full", 16, 256, -1, 1),
    # 1024 x 4096 as 16 micro-batches of 64 rows (1 per chip): 9.63 of 16 GiB per chip (v5e);
    # 9.05 of 95 on v5p:4x4x4, where the old defaults (remat none, no accumulation) needed 2.07T.
    "7b": ("TPU v5 lite:8x8", "full", 16, 512, -1, 1),
    # 1024 x 4096 as 8 micro-batches of 128 rows (1 per chip): 11.68 of 16 GiB per chip.
    "13b": ("TPU v5 lite:8x16", "full", 8, 512, -1, 1),
    # 1024 x 4096 as 32 micro-batches of 32 rows, one per fsdp group: fsdp=-1 fills 32 of the 256
    # chips and tensor=8 splits heads, MLP and vocabulary over the rest: 14.65 of 16 GiB per chip.
    # (fsdp=64 x tensor=4 with 16 micro-batches of 64 rows measured 16.85: 0.85 GiB too much.)
    # On a 512-chip slice (fsdp=64 there) add --config.grad_accum=16.
    "70b": ("TPU v5 lite:16x16", "full", 32, 512, -1, 8),
}


def model_config(size: str) -> ml_collections.ConfigDict:
  d, layers, heads, kv_heads, mlp, vocab, max_len, theta, tied = SIZES[size]
  return ml_collections.ConfigDict(dict(
      family="decoder",        # the model family (foundation/registry.py): the decoder-only LM
      vocab_size=vocab,
      d_model=d,
      n_layers=layers,
      n_heads=heads,
      n_kv_heads=kv_heads,
      head_dim=d // heads,
      mlp_dim=mlp,
      max_seq_len=max_len,     # the longest sequence the model is meant for (rotary table size)
      rope_theta=theta,
      norm_eps=1e-5,
      tie_embeddings=tied,
      dtype="bfloat16",        # compute dtype; params stay `param_dtype`
      param_dtype="float32",
      attention="xla",         # jax.nn.dot_product_attention implementation: 'xla' or 'cudnn' (GPU)
      scan_layers=True,        # one compiled layer scanned n_layers times (fast compiles)
      # Rematerialisation, most memory to least: 'none', 'minimal' (save all matmul outputs),
      # 'dots' (save weight-matmul outputs, recompute attention), 'full' (save block inputs only).
      remat_policy="none",
      # Make logits and cross-entropy this many positions at a time (0: all at once). Saves the
      # float32 [batch, seq_len, vocab] tensor, which dominates memory for large vocabularies.
      logits_chunk=0,
      # Pre-trained families (`python -m foundation.hf import` sets these from an HF config.json);
      # the defaults are the plain LLaMA architecture.
      qkv_bias=False,          # biases on the q/k/v projections (Qwen2)
      rope_scaling="none",     # 'none' or 'llama3' (Llama 3.1+: low rotary frequencies scaled)
      rope_scaling_factor=8.0,     # llama3: low frequencies are divided by this
      rope_low_freq_factor=1.0,    # llama3: wavelengths above original_max_len / this are scaled
      rope_high_freq_factor=4.0,   # llama3: wavelengths below original_max_len / this are kept
      rope_original_max_len=8192,  # llama3: the context length of the model's first training
      sliding_window=0,        # attend to the last N tokens only (Mistral); 0: the whole context
      # Fine-tuning (configs/finetune.py sets it; LoRA is the run's `lora` group).
      num_classes=0,           # > 0: a sequence classifier head instead of the vocabulary output
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, size="tiny", quick=False)
  size = args["size"]
  if size not in SIZES:
    raise ValueError(f"config argument size={size!r} is unknown{common.did_you_mean(size, SIZES)}; "
                     f"sizes: {', '.join(SIZES)}")
  batch_size, seq_len, steps, lr = RUNS[size]

  config = ml_collections.ConfigDict()
  config.size = size
  config.seed = 0
  config.steps = steps
  config.batch_size = batch_size   # global, over all hosts and devices
  config.grad_accum = 1            # micro-batches per step (each batch_size / grad_accum rows)
  config.seq_len = seq_len
  config.model = model_config(size)
  config.mesh = common.mesh_config()
  config.optim = common.optim_config()
  config.optim.lr = lr
  config.optim.warmup_steps = min(2000, max(1, steps // 10))
  config.data = common.data_config()
  config.task = "lm"               # 'lm' (next-token loss); see configs/finetune.py for the others
  # Starting and resuming (docs/reliability.md). resume: 'auto' (continue from the workdir's
  # latest checkpoint, or start) or 'required' (refuse to start without one).
  config.resume = "auto"
  # A workdir or one of its checkpoints/<step> folders: start from its params (a fresh optimizer);
  # ignored once the workdir has its own checkpoints.
  config.init_from = ""
  config.init_from_partial = False  # load the params whose names and shapes match; init the rest
  config.init_from_skip = ""       # comma-separated regexes of params to init afresh ('head/.*')
  config.lora = common.lora_config()  # LoRA adapters (configs/finetune.py:lora); rank 0: none
  config.trainable = ""            # regexes of the params that train ('head/': a linear probe); '' all
  config.guard = common.guard_config()
  config.checkpoint = common.checkpoint_config()
  config.eval = common.eval_config()
  config.evaluate = common.evaluate_config()  # task evaluators (off unless evaluate.every > 0)
  config.log = common.log_config()

  if size in FIT_DEFAULTS:  # settings that fit the size's smallest slice (see FIT_DEFAULTS)
    _, remat, accum, chunk, fsdp, tensor = FIT_DEFAULTS[size]
    config.model.remat_policy, config.grad_accum, config.model.logits_chunk = remat, accum, chunk
    config.mesh.fsdp, config.mesh.tensor = fsdp, tensor
  if size in ("test", "tiny"):
    # Small models on a CPU: float32 compute is as fast as bf16 there and keeps tests exact.
    config.model.dtype = "float32"
    config.checkpoint.every = 100
  if size == "test":
    config.log.every = 1
    config.eval.every = 10
    config.eval.steps = 2
    config.checkpoint.every = 10
    config.log.generate_tokens = 8
  if args["quick"]:
    common.quick(config)
  return config.lock()
