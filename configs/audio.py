r"""Audio encoders on log-mel spectrograms (family 'audio'): supervised classification, masked
pre-training and linear probing.

The CPU demo (the embedded synthesised sounds, 12 classes, offline):
  python -m foundation.train --config configs/audio.py:size=tiny --workdir runs/audio
Masked-spectrogram-patch pre-training, then a linear probe on its encoder:
  python -m foundation.train --config configs/audio.py:size=tiny,preset=mae --workdir runs/audio-mae
  python -m foundation.train --config configs/audio.py:size=tiny,preset=probe \
      --config.init_from=runs/audio-mae --workdir runs/audio-probe
Speech commands (a TFDS dataset prepared under data.tfds_data_dir), AST-B/16:
  python -m foundation.train --config configs/audio.py:size=B,dataset=speech_commands \
      --config.data.tfds_data_dir=/data/tfds --workdir runs/kws
A folder of WAV files with one sub-folder per class:
  python -m foundation.train --config configs/audio.py:size=S \
      --config.data.source=files:/data/sounds --config.model.num_classes=20 --workdir runs/sounds

Arguments after the colon: `size=` one of foundation/models/audio.py SIZES (test, tiny, S, B, L);
`preset=` supervised (default), mae or probe; `arch=` patch (AST, default) or conv (Whisper's
stem); `dataset=` a TFDS name below; `quick` shortens the run. Every field can be overridden.
"""

import ml_collections

from configs import common
from foundation.data import audio_input
from foundation.models import audio

PRESETS = ("supervised", "mae", "probe")
# (size, preset): (steps, global batch_size, peak lr) on the embedded sounds
RUNS = {
    ("test", "supervised"): (60, 32, 3e-3),
    ("test", "mae"): (60, 32, 3e-3),
    ("test", "probe"): (60, 32, 1e-2),
    ("tiny", "supervised"): (600, 64, 2e-3),
    ("tiny", "mae"): (1200, 64, 1e-3),
    ("tiny", "probe"): (400, 64, 1e-2),
}
# TFDS name: (classes, train split, eval split, sample rate, clip seconds)
DATASETS = {
    "speech_commands": (12, "train", "validation", 16_000, 1.28),
    "crema_d": (6, "train", "validation", 16_000, 2.56),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, size="tiny", preset="supervised", arch="patch", dataset="",
                          quick=False)
  size, preset, dataset = args["size"], args["preset"], args["dataset"]
  if size not in audio.SIZES:
    raise ValueError(f"config argument size={size!r} is unknown; sizes: {', '.join(audio.SIZES)}")
  if preset not in PRESETS:
    raise ValueError(f"config argument preset={preset!r} is unknown; presets: "
                     f"{', '.join(PRESETS)}")
  if args["arch"] not in audio.FRONTENDS:
    raise ValueError(f"config argument arch={args['arch']!r} is unknown; use one of "
                     f"{', '.join(audio.FRONTENDS)}")
  if dataset and dataset not in DATASETS:
    raise ValueError(f"config argument dataset={dataset!r} is unknown; datasets: "
                     f"{', '.join(DATASETS)} (or set --config.data.source=tfds:NAME)")
  steps, batch_size, lr = RUNS.get((size, preset), (100_000, 1024, 5e-4))

  config = common.run_config(steps=steps, batch_size=batch_size, lr=lr)
  config.size = size
  config.task = "audio_mae" if preset == "mae" else "audio_classify"
  config.model = ml_collections.ConfigDict(audio.model_config(
      size, frontend=args["arch"], num_classes=0 if preset == "mae" else 12))
  config.data = audio_input.audio_data_config()
  config.optim.weight_decay = 0.05
  config.optim.b2 = 0.999
  config.optim.min_lr_ratio = 0.05
  config.mesh.rules = tuple(config.mesh.rules) + audio.AUDIO_RULES
  if preset == "mae":
    # The masking is the augmentation: no SpecAugment on what the model reconstructs.
    config.data.pp_train = "decode|resample|random_crop|log_mel|standardize"
  if preset == "probe":
    # Only the head learns (the core's trainable mask: the encoder gets no update and no Adam
    # moments), on an encoder loaded with --config.init_from=WORKDIR of an 'mae' or 'supervised'
    # run.
    config.trainable = "^head/"
    config.optim.weight_decay = 0.0
    config.init_from_skip = "head/.*,decoder/.*"
    config.data.pp_train = "decode|resample|random_crop|log_mel|standardize"
  if dataset:
    classes, train_split, eval_split, rate, seconds = DATASETS[dataset]
    config.data.source = f"tfds:{dataset}"
    config.data.train_split, config.data.eval_split = train_split, eval_split
    config.data.sample_rate, config.data.clip_seconds = rate, seconds
    config.data.window, config.data.hop, config.data.fft_length = 400, 160, 512
    config.data.mel_bins = 128
    # Short utterances are zero-padded to the clip (pad) before the crop.
    config.data.pp_train = config.data.pp_train.replace("random_crop", "pad|random_crop")
    config.data.pp_eval = config.data.pp_eval.replace("center_crop", "pad|center_crop")
    if preset != "mae":
      config.model.num_classes = classes
  if size not in ("test", "tiny"):
    config.model.remat_policy = "full"
  if size in ("test", "tiny"):
    # Plain Adam on the small synthesised set, as the ViT's CPU sizes.
    config.optim.clip_norm = 0.0
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = max(steps // 10, 1)
    config.checkpoint.every = 200
    config.eval.every = 100
    config.eval.steps = 5
    config.log.every = 25
  if size == "test":
    config.checkpoint.every = 20
    config.eval.every = 30
    config.eval.steps = 2
    config.log.every = 10
  if args["quick"]:
    common.quick(config)
  return config.lock()
