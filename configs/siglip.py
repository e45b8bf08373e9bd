r"""Contrastive image-text models (the two-tower family; tasks siglip and clip).

The CPU demo (the embedded drawn scenes with captions, offline):
  python -m foundation.train --config configs/siglip.py:size=tiny --workdir runs/siglip
  python -m foundation.train --config configs/siglip.py:size=tiny,loss=softmax --workdir runs/clip

Image-caption pairs from a JSONL file of image paths, or a prepared TFDS dataset:
  python -m foundation.train --config configs/siglip.py:size=tiny \
      --config.data.source=files:/data/pets/captions.jsonl --workdir runs/pets
  python -m foundation.train --config configs/siglip.py:size=B,dataset=coco_captions \
      --config.data.tfds_data_dir=/data/tfds --workdir runs/coco

Arguments after the colon: `size=` test, tiny or B (foundation/models/two_tower.py SIZES);
`loss=` sigmoid (SigLIP, task 'siglip') or softmax (CLIP, task 'clip'); `dataset=` a TFDS name
(coco_captions); `quick` shortens the run. docs/image_text.md has the figures.
"""

import ml_collections

from configs import common
from foundation.data import image_text_input
from foundation.models import two_tower
from foundation.models import vit

# size: (steps, global batch_size, peak lr) on the embedded scenes
RUNS = {
    "test": (60, 32, 3e-3),
    "tiny": (1000, 128, 1e-3),
}
LOSSES = {"sigmoid": "siglip", "softmax": "clip"}
# TFDS name: (image_size, train split, eval split)
DATASETS = {"coco_captions": (224, "train", "val")}

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, size="tiny", loss="sigmoid", dataset="", quick=False)
  size, loss, dataset = args["size"], args["loss"], args["dataset"]
  if size not in two_tower.SIZES:
    raise ValueError(f"config argument size={size!r} is unknown; sizes: "
                     f"{', '.join(two_tower.SIZES)}")
  if loss not in LOSSES:
    raise ValueError(f"config argument loss={loss!r} is unknown; use sigmoid or softmax")
  if dataset and dataset not in DATASETS:
    raise ValueError(f"config argument dataset={dataset!r} is unknown; datasets: "
                     f"{', '.join(DATASETS)} (or set --config.data.source=tfds:NAME)")
  steps, batch_size, lr = RUNS.get(size, (100_000, 16_384, 1e-3))
  config = common.run_config(steps=steps, batch_size=batch_size, lr=lr)
  config.size = size
  config.task = LOSSES[loss]
  fields = two_tower.model_config(size)
  if loss == "softmax":  # CLIP's initial temperature 0.07 and no bias
    fields.update(temperature_init=1 / 0.07, bias_init=0.0, max_scale=100.0)
  config.model = ml_collections.ConfigDict(fields)
  config.data = image_text_input.image_text_data_config()
  config.optim.weight_decay = 1e-4
  config.optim.b2 = 0.95
  config.optim.min_lr_ratio = 0.05
  config.mesh.rules = tuple(config.mesh.rules) + vit.IMAGE_RULES + two_tower.TWO_TOWER_RULES
  # The periodic evaluators (foundation/tasks/contrastive.py): zero-shot on held-out
  # colour-shape combinations, and retrieval over the eval split.
  config.evaluate = common.evaluate_config()
  config.evaluate.tasks = "zeroshot,retrieval"
  if dataset:
    image_size, train_split, eval_split = DATASETS[dataset]
    config.data.source = f"tfds:{dataset}"
    config.data.image_size = image_size
    config.data.train_split, config.data.eval_split = train_split, eval_split
    config.data.pp_train = f"decode|inception_crop({image_size})|value_range(-1,1)"
    config.data.pp_eval = f"decode|resize({image_size})|center_crop({image_size})|value_range(-1,1)"
    config.evaluate.tasks = "retrieval"
  if size in ("test", "tiny"):
    if loss == "sigmoid":
      # b starts near -log(batch): the odds of a random pair being the positive one. SigLIP's -10
      # is that for its 32k batches; at 128 rows it costs the first steps ~10 nats per image,
      # and Adam moves the scalar b by about lr per step.
      config.model.bias_init = -5.0
    config.optim.clip_norm = 0.0
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = max(1, steps // 10)
    config.checkpoint.every = 400
    config.eval.every = 200
    config.eval.steps = 4
    config.evaluate.every = 400
    config.log.every = 50
  else:
    config.model.image.remat_policy = config.model.text.remat_policy = "full"
  if size == "test":
    config.checkpoint.every = 20
    config.eval.every = 30
    config.eval.steps = 2
    config.evaluate.every = 0
    config.log.every = 10
    config.data.num_train, config.data.num_eval, config.data.num_heldout = 2000, 200, 200
  if args["quick"]:
    common.quick(config)
  return config.lock()
