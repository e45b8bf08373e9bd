"""Shared pieces of the experiment configs: argument parsing and the default groups.

A config file's `get_config(arg)` receives the text after the colon in
`--config configs/lm.py:size=tiny,quick`. `parse_arg` turns it into a dict:
`key=value` pairs become strings, bare words become `True`.
"""

import ml_collections

# The default groups live in the library (foundation/defaults.py), so that a workdir's config and
# an imported model's are completed without the library importing configs/. Re-exported here for
# the config files.
from foundation.defaults import (checkpoint_config, data_config, eval_config,  # noqa: F401
                                 evaluate_config, guard_config, log_config, mesh_config,
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
          f"config argument '{key}' is unknown; known arguments: {sorted(defaults)} "
          f"(example: --config configs/lm.py:size=tiny,quick)")
    parsed[key] = value.strip() if eq else True
  return parsed
