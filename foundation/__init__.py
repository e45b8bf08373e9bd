"""foundation: pre-train foundation models with JAX/Flax over a device mesh, then adapt them."""

__version__ = "0.1.0"
