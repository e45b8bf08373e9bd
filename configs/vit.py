r"""Vision Transformers: supervised image classification (the ViT family, task image_classify).

The CPU demo (the embedded drawn shapes, 10 classes, offline):
  python -m foundation.train --config configs/vit.py:size=tiny --workdir runs/vit-tiny

ImageNet-1k at 224 px, B/16, on a TPU slice (a TFDS dataset prepared under data.tfds_data_dir):
  python -m foundation.train --config configs/vit.py:size=B,dataset=imagenet2012 \
      --workdir gs://…/vit-b16 --config.data.tfds_data_dir=gs://…/tfds

A folder of images with one sub-folder per class:
  python -m foundation.train --config configs/vit.py:size=S \
      --config.data.source=files:/data/flowers --config.model.num_classes=102 --workdir runs/flowers

Arguments after the colon: `size=` one of foundation/models/vit.py SIZES (test, tiny, Ti, S, B,
L, H); `dataset=` a TFDS name with its image size, classes and preprocessing below (default: the
embedded shapes); `quick` shortens the run. Every field can be overridden with --config.a.b=value.
"""

import ml_collections

from configs import common
from foundation.data import image_input
from foundation.models import vit

# size: (steps, global batch_size, peak lr) on the embedded shapes
RUNS = {
    "test": (120, 32, 3e-3),
    "tiny": (1500, 128, 1e-3),   # >= 90% held-out top-1 in about 5 minutes on a 2-core CPU
}
# TFDS name: (image_size, num_classes, train split, eval split)
DATASETS = {
    "cifar10": (32, 10, "train", "test"),
    "cifar100": (32, 100, "train", "test"),
    "oxford_flowers102": (224, 102, "train", "test"),
    "imagenet2012": (224, 1000, "train", "validation"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, size="tiny", dataset="", quick=False)
  size, dataset = args["size"], args["dataset"]
  if size not in vit.SIZES:
    raise ValueError(f"config argument size={size!r} is unknown; sizes: {', '.join(vit.SIZES)}")
  if dataset and dataset not in DATASETS:
    raise ValueError(f"config argument dataset={dataset!r} is unknown; datasets: "
                     f"{', '.join(DATASETS)} (or set --config.data.source=tfds:NAME)")
  steps, batch_size, lr = RUNS.get(size, (90_000, 4096, 1e-3))

  config = common.run_config(steps=steps, batch_size=batch_size, lr=lr)
  config.size = size
  config.task = "image_classify"
  config.model = ml_collections.ConfigDict(vit.model_config(size, num_classes=10))
  config.data = image_input.image_data_config()
  config.optim.weight_decay = 1e-4
  config.optim.b2 = 0.999
  config.optim.min_lr_ratio = 0.05
  # The image input's logical names (height, width, channels) are not split: the batch is.
  config.mesh.rules = tuple(config.mesh.rules) + vit.IMAGE_RULES
  if dataset:
    image_size, classes, train_split, eval_split = DATASETS[dataset]
    config.data.source = f"tfds:{dataset}"
    config.data.image_size = image_size
    config.data.train_split, config.data.eval_split = train_split, eval_split
    config.model.num_classes = classes
    if image_size >= 224:  # the ViT paper's preprocessing for ImageNet-size images
      config.data.pp_train = (f"decode|inception_crop({image_size})|flip_lr|value_range(-1,1)")
      config.data.pp_eval = f"decode|resize(256)|center_crop({image_size})|value_range(-1,1)"
  if size not in ("test", "tiny"):
    # Measured with python -m foundation.compile (benchmarks/results/fit-vit-B16-imagenet.json):
    # B/16 at batch 4096 x 224 px on v5p:2x2x2 needs 133 GiB of temporaries per chip with remat
    # none, 17.2 of 95 GiB with remat full.
    config.model.remat_policy = "full"
  if size in ("test", "tiny"):
    # Plain Adam on the small drawn set: measured 92.8% held-out top-1 at 1,000 steps this way
    # (tests/test_vit.py's loop), where clipping at 1.0 and weight decay 1e-4 gave 86.6%.
    config.optim.clip_norm = 0.0
    config.optim.weight_decay = 0.0
    config.checkpoint.every = 500
    config.eval.every = 250
    config.eval.steps = 8
    config.log.every = 50
  if size == "test":
    config.checkpoint.every = 20
    config.eval.every = 40
    config.eval.steps = 4
    config.log.every = 10
  if args["quick"]:
    common.quick(config)
  return config.lock()
