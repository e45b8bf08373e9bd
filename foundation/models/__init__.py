"""Pure Flax Linen models: `layers` holds the block's pieces, `transformer` the decoder-only LM."""

import dataclasses
from typing import Any

import jax.numpy as jnp


class Dtypes:
  """A family config's dtypes as jnp dtypes, from its `dtype` (compute) and `param_dtype` names."""

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


def dataclass_from_config(cls, config: Any):
  """A family's frozen config dataclass from `config.model` (a ConfigDict or mapping): fields it
  has beyond the dataclass's are ignored (model.family, ...), and fields with a default may be
  absent (a config.json written before they existed)."""
  fields = dataclasses.fields(cls)
  missing = [f.name for f in fields if f.name not in config and f.default is dataclasses.MISSING]
  if missing:
    raise ValueError(f"config.model lacks {', '.join(missing)}")
  return cls(**{f.name: f.type(config[f.name]) for f in fields if f.name in config})
