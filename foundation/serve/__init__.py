"""The HTTP server: python -m foundation.serve (docs/serving.md)."""
