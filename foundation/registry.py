"""Model families, tasks, inputs and evaluators, found by the names a config gives.

The core (train.py, step.py, checkpoint.py, metrics.py, config.py) knows none of them by name: it
asks the registry for `config.model.family`, `config.task`, the task's input and evaluators.
Adding a modality is adding entries, never a branch in the core (docs/architecture.md, "Adding a
family").

  @registry.register("family", "vit")
  class ViTFamily: ...

  family = registry.get("family", config.model.family, field="model.family")

The built-in entries register themselves when their modules are imported; `get` imports them
first. A config file (or a test) may register its own entries before the trainer looks them up:
the trainer loads the config file before anything else.
"""

import difflib
import importlib

KINDS = ("family", "task", "input", "evaluator")

# Modules whose import registers the built-in entries.
BUILTIN_MODULES = (
    "foundation.models.transformer",
    "foundation.models.vit",
    "foundation.tasks.text",
    "foundation.tasks.images",
    "foundation.models.two_tower",
    "foundation.tasks.contrastive",
    "foundation.tasks.audio",  # and foundation.models.audio, which it imports
    "foundation.models.vlm",
    "foundation.tasks.vlm",
)

_ENTRIES: dict[str, dict[str, object]] = {kind: {} for kind in KINDS}
_loaded = False


class UnknownName(ValueError):
  """A config names an entry that is not registered; the message names the field."""


def register(kind: str, name: str):
  """Decorator: registers `obj` as the `kind` entry `name` (a second, different one is an error)."""
  if kind not in KINDS:
    raise ValueError(f"registry kind {kind!r} is not one of {KINDS}")

  def add(obj):
    known = _ENTRIES[kind].get(name)
    if known is not None and _qualname(known) != _qualname(obj):
      raise ValueError(f"{kind} {name!r} is registered twice: {_qualname(known)} and "
                       f"{_qualname(obj)}")
    _ENTRIES[kind][name] = obj
    return obj
  return add


def _qualname(obj) -> str:
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def load_builtins() -> None:
  global _loaded
  if not _loaded:
    _loaded = True
    for module in BUILTIN_MODULES:
      importlib.import_module(module)


def names(kind: str) -> list[str]:
  load_builtins()
  return sorted(_ENTRIES[kind])


def get(kind: str, name: str, field: str | None = None):
  """The `kind` entry `name`; an unknown name is one line naming the field, with "did you mean"."""
  load_builtins()
  entries = _ENTRIES[kind]
  if name in entries:
    return entries[name]
  close = difflib.get_close_matches(str(name), entries, n=3, cutoff=0.5)
  hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
  raise UnknownName(f"{field or kind}={name!r} is not a registered {kind}{hint} "
                    f"(known: {', '.join(sorted(entries))})")
