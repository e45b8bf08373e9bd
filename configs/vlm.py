r"""An image-conditioned language model (the vlm family, task vlm): captions and visual questions.

The CPU demo (the embedded drawn scenes with captions and question/answer pairs, offline):
  python -m foundation.train --config configs/vlm.py:size=tiny --workdir runs/vlm
  python -m foundation.generate --workdir runs/vlm --image scene.png \
      --prompt "<image> question: what colour are the shapes? answer:"
The text-only baseline (the same decoder, data and steps; no image):
  python -m foundation.train --config configs/vlm.py:size=tiny,text_only --workdir runs/vlm-text

From a pre-trained image tower and LM (either pair may be left out; `trainable` freezes a part):
  python -m foundation.train --config configs/vlm.py:size=tiny --workdir runs/vlm-ft \
      --config.init_from=image=runs/vit,decoder=runs/lm --config.trainable='^(projection|decoder)/'

A decoder from the README's LM demo (runs/tiny, configs/lm.py:size=tiny): `lm=tiny` gives the
decoder that size's shapes, so its workdir loads:
  python -m foundation.train --config configs/vlm.py:size=tiny,lm=tiny --workdir runs/vlm-lm \
      --config.init_from=decoder=runs/tiny

Arguments after the colon: `size=` test, tiny or B (foundation/models/vlm.py SIZES); `lm=` a
configs/lm.py size for the decoder's shapes; `text_only` (the baseline); `quick` shortens the
run. docs/vlm.md has the figures.
"""

import ml_collections

from configs import common
from configs import lm as lm_configs
from foundation.models import vit
from foundation.models import vlm
from foundation.tasks import vlm as vlm_task

# The decoder fields that make it configs/lm.py's network (model_config): the param shapes, and
# the rotary and norm constants the LM was trained with.
DECODER_SHAPE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings")

# size: (steps, global batch_size, peak lr) on the embedded scenes
RUNS = {
    "test": (40, 16, 3e-3),
    "tiny": (1500, 64, 2e-3),   # docs/vlm.md: benchmarks/vlm.py --steps 1500
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, size="tiny", text_only=False, lm="", quick=False)
  size = args["size"]
  if size not in vlm.SIZES:
    raise ValueError(f"config argument size={size!r} is unknown; sizes: {', '.join(vlm.SIZES)}")
  if args["lm"] and args["lm"] not in lm_configs.SIZES:
    raise ValueError(f"config argument lm={args['lm']!r} is unknown; configs/lm.py sizes: "
                     f"{', '.join(lm_configs.SIZES)}")
  steps, batch_size, lr = RUNS.get(size, (100_000, 1024, 3e-4))
  config = common.run_config(steps=steps, batch_size=batch_size, lr=lr)
  config.size = size
  config.task = "vlm"
  config.model = ml_collections.ConfigDict(vlm.model_config(
      size, max_seq_len=128 if size in ("test", "tiny") else 512,
      text_only=bool(args["text_only"])))
  if args["lm"]:  # the decoder takes an LM size's shapes, so that LM's workdir loads into it
    lm_model = lm_configs.model_config(args["lm"])
    config.model.decoder.update({field: lm_model[field] for field in DECODER_SHAPE})
  config.data = vlm_task.data_config()
  config.mesh.rules = tuple(config.mesh.rules) + vit.IMAGE_RULES
  config.optim.min_lr_ratio = 0.05
  # The exact-match evaluator (foundation/tasks/vlm.py): greedy answers and captions of the
  # held-out colour-shape combinations.
  config.evaluate = common.evaluate_config()
  config.evaluate.tasks = "vlm_exact"
  config.evaluate.limit = 200
  if size in ("test", "tiny"):
    # Adam's slower second moment: at 600 steps it wrote 52% of eval-split captions exactly,
    # against 45% with b2=0.95 (one seed each).
    config.optim.b2 = 0.999
    config.optim.clip_norm = 1.0
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = max(1, steps // 20)
    config.checkpoint.every = 400
    config.eval.every = 200
    config.eval.steps = 4
    config.evaluate.every = 0
    config.log.every = 50
    config.data.num_train, config.data.num_eval, config.data.num_heldout = 4000, 200, 200
  else:
    config.model.image.remat_policy = config.model.decoder.remat_policy = "full"
  if size == "test":
    config.checkpoint.every = 20
    config.eval.every = 20
    config.eval.steps = 2
    config.log.every = 10
    config.data.text_len = 48
    config.model.decoder.max_seq_len = 80
    config.data.num_train, config.data.num_eval, config.data.num_heldout = 400, 64, 32
  if args["quick"]:
    common.quick(config)
  return config.lock()
