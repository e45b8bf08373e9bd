"""Shared pieces of the experiment configs: argument parsing and the default groups.

A config file's `get_config(arg)` receives the text after the colon in
`--config configs/lm.py:size=tiny,quick`. `parse_arg` turns it into a dict:
`key=value` pairs become strings, bare words become `True`.
"""

import difflib

import ml_collections

# The default groups live in the library (foundation/defaults.py), so that a workdir's config and
# an imported model's are completed without the library importing configs/. Re-exported here for
# the config files.
from foundation.defaults import (checkpoint_config, data_config, eval_config,  # noqa: F401
                                 evaluate_config, guard_config, log_config, lora_config, mesh_config,
                                 optim_config, run_config)


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
          f"config argument '{key}' is unknown{did_you_mean(key, defaults)}; known arguments: "
          f"{sorted(defaults)} (example: --config configs/lm.py:size=tiny,quick)")
    parsed[key] = value.strip() if eq else True
  return parsed


def did_you_mean(value: str, known) -> str:
  """" (did you mean 'tiny'?)" for the closest of `known`, or "" when none is close."""
  close = difflib.get_close_matches(str(value), [str(k) for k in known], n=1, cutoff=0.5)
  return f" (did you mean {close[0]!r}?)" if close else ""


def quick(config) -> None:
  """`,quick`: a 20-step end-to-end check of any config (small evals, early checkpoints)."""
  config.steps = 20
  config.optim.warmup_steps = 5
  config.eval.every = 10
  config.eval.steps = 2
  config.checkpoint.every = 10
  config.log.every = 5
  config.log.generate_tokens = min(config.log.generate_tokens, 16)
