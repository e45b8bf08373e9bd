"""Pure Flax Linen models: `layers` holds the block's pieces, `transformer` the decoder-only LM."""
