"""Checks a config before any device work, so that a mistake costs a second, not a compile.

Every message names the field(s) and the numbers. Unknown keys and wrong types on the command line
are caught earlier still, by the locked ConfigDict (`--config.a.b=value` parsing).
"""

import math

from foundation import lora
from foundation import mesh as mesh_lib
from foundation import registry


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the numbers."""


# Fields every run has, whatever its family and task.
POSITIVE = ("steps", "batch_size", "grad_accum", "checkpoint.keep", "log.every")


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def float_fields(config, prefix: str = ""):
  """(dotted name, value) of every float field, however deep (a tuple's items too)."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from float_fields(value, f"{name}.")
    elif isinstance(value, (tuple, list)):
      yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))
    elif isinstance(value, float):
      yield name, value


def check_finite(config) -> None:
  """No float field is NaN or infinite: one would turn every param into NaN at the first update."""
  for name, value in float_fields(config):
    if not math.isfinite(value):
      raise ConfigError(f"{name}={value} is not a finite number")


def family_and_task(config):
  """(family class, task object) the config names; an unknown name is a ConfigError."""
  try:
    return (registry.get("family", config.model.get("family", "decoder"), field="model.family"),
            registry.get("task", config.get("task", "lm"), field="task")(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_values(config) -> None:
  """Field-by-field checks that need no devices: the core's, then the family's and the task's."""
  check_finite(config)
  family, task = family_and_task(config)
  for field in POSITIVE + tuple(getattr(family, "POSITIVE", ())):
    if _get(config, field) <= 0:
      raise ConfigError(f"{field} must be positive, got {_get(config, field)}")
  for field, choices in getattr(family, "CHOICES", {}).items():
    if _get(config, field) not in choices:
      raise ConfigError(f"{field}={_get(config, field)!r} is not one of {choices}")
  try:
    family.check(config)
    task.check(config)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None
  o = config.optim
  if o.lr < 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError(f"optim.lr={o.lr}, optim.warmup_steps={o.warmup_steps} must be >= 0 and "
                      f"optim.min_lr_ratio={o.min_lr_ratio} in [0, 1]")
  if config.eval.every > 0 and config.eval.steps <= 0:
    raise ConfigError(f"eval.steps={config.eval.steps} must be positive when "
                      f"eval.every={config.eval.every} > 0")
  if config.checkpoint.every <= 0:
    raise ConfigError(f"checkpoint.every={config.checkpoint.every} must be positive")
  if "guard" in config:
    check_start_and_guard(config)
  init_from_skip(config)
  init_from_sources(config)
  patterns(config, "trainable")
  try:
    lora.check(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_start_and_guard(config) -> None:
  """resume / init_from / guard.* (docs/reliability.md)."""
  if config.resume not in ("auto", "required"):
    raise ConfigError(f"resume={config.resume!r} is not one of ('auto', 'required')")
  g = config.guard
  if g.nonfinite not in ("skip", "stop"):
    raise ConfigError(f"guard.nonfinite={g.nonfinite!r} is not one of ('skip', 'stop')")
  if g.max_skips_in_a_row <= 0 or g.spike_warmup < 0:
    raise ConfigError(f"guard.max_skips_in_a_row={g.max_skips_in_a_row} must be positive and "
                      f"guard.spike_warmup={g.spike_warmup} >= 0")
  if g.loss_spike and g.loss_spike <= 1:
    raise ConfigError(f"guard.loss_spike={g.loss_spike} must be 0 (off) or above 1: an update is "
                      f"skipped when its loss is above loss_spike x the recent mean")
  try:
    inject_nan_steps(config)
  except ValueError:
    raise ConfigError(f"guard.inject_nan_at={g.inject_nan_at!r} must be comma-separated step "
                      f"numbers, e.g. '7,12'") from None


def init_from_sources(config, params=None) -> list[tuple[str, str, str]]:
  """[(prefix, workdir, group)] of `init_from`: [('', W, '')] for one workdir whose params are
  the model's whole tree, or one triple per 'PREFIX=WORKDIR' item ('image=runs/vit,decoder=
  runs/lm'), each loading that workdir's whole tree into the model's group PREFIX; with
  'PREFIX=WORKDIR:GROUP' ('image=runs/siglip:image') only the workdir's group GROUP loads there.
  With `params` (the model's tree), a prefix that names no group of it is a ConfigError listing
  the groups."""
  text = str(config.get("init_from", "")).strip()
  if not text:
    return []
  items = [item.strip() for item in text.split(",") if item.strip()]
  if not all("=" in item for item in items):
    if len(items) > 1 or "=" in text:
      raise ConfigError(f"init_from={text!r}: give one workdir, or PREFIX=WORKDIR pairs separated "
                        f"by commas (e.g. 'image=runs/vit,decoder=runs/lm')")
    return [("", text, "")]
  pairs = []
  for item in items:
    prefix, source = (part.strip() for part in item.split("=", 1))
    prefix = prefix.strip("/")
    if not prefix or not source:
      raise ConfigError(f"init_from={text!r}: {item!r} needs both a prefix and a workdir "
                        f"(PREFIX=WORKDIR)")
    if params is not None:
      node = params
      for key in prefix.split("/"):
        if not isinstance(node, dict) or key not in node:
          groups = ", ".join(sorted(params)) if isinstance(params, dict) else "none"
          raise ConfigError(f"init_from={text!r}: the model has no params group {prefix!r} "
                            f"(its groups: {groups})")
        node = node[key]
    if any(p == prefix or p.startswith(prefix + "/") or prefix.startswith(p + "/")
           for p, *_ in pairs):
      raise ConfigError(f"init_from={text!r}: {prefix!r} overlaps another prefix; each group "
                        f"loads from one workdir")
    group = ""
    head, colon, tail = source.rpartition(":")
    if colon and head and tail and not tail.startswith("/"):  # not a URL's 'gs://'
      source, group = head, tail.strip("/")
    pairs.append((prefix, source, group))
  return pairs


def patterns(config, field: str) -> list:
  """The compiled regexes of a comma-separated top-level field ('head/.*,pos_embedding'); a bad
  one is a ConfigError naming the field."""
  import re  # pylint: disable=g-import-not-at-top
  compiled = []
  for part in str(config.get(field, "")).split(","):
    if part.strip():
      try:
        compiled.append(re.compile(part.strip()))
      except re.error as e:
        raise ConfigError(f"{field}={config[field]!r}: {part.strip()!r} is not a regular "
                          f"expression ({e})") from None
  return compiled


def init_from_skip(config) -> list:
  """The patterns of `init_from_skip`: params whose path ('head/kernel') matches one are
  initialised, not loaded from init_from (big_vision's `dont_load`)."""
  return patterns(config, "init_from_skip")


def inject_nan_steps(config) -> tuple[int, ...]:
  """The steps of guard.inject_nan_at, e.g. '7,12' -> (7, 12)."""
  text = config.guard.inject_nan_at if "guard" in config else ""
  return tuple(int(part) for part in str(text).split(",") if part.strip())


def check_mesh(config, devices, process_count: int) -> None:
  """The mesh fits the devices, and everything the rules split divides evenly over its axes."""
  try:
    ici, dcn = mesh_lib.mesh_shape(config.mesh, devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  degrees = {a: ici[a] * dcn[a] for a in mesh_lib.AXES}
  rules = dict(mesh_lib.rules(config))

  def split(name):
    """(number of ways the logical axis `name` is split, 'axis=n * ...' to show it)."""
    axes = rules.get(name) or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(degrees[a] for a in axes), " * ".join(f"mesh.{a}={degrees[a]}" for a in axes)

  dp, dp_text = split("batch")
  if config.batch_size % dp:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the data-parallel "
                      f"degree {dp} ({dp_text})")
  if config.batch_size % (dp * config.grad_accum):
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by grad_accum="
                      f"{config.grad_accum} micro-batches x the data-parallel degree {dp}: each "
                      f"micro-batch must split evenly over {dp_text}")
  if config.batch_size % process_count:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the number of "
                      f"processes {process_count}")
  family, task = family_and_task(config)
  split_sizes = {**getattr(family, "SPLIT_SIZES", {}), **task.split_sizes(config)}
  for name, field in split_sizes.items():
    ways, text = split(name)
    size = _get(config, field)
    if size % ways:
      raise ConfigError(f"{field}={size} cannot be split {ways} ways over {text} (logical axis "
                        f"'{name}'): choose degrees that divide it")


def check_param_shardings(abstract_params, shardings, mesh) -> None:
  """Every sharded param dimension divides evenly over its mesh axes (names the param and axes)."""
  import jax  # local: keeps this module importable for value checks alone

  def check(path, leaf, sharding):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(
            f"param {name} of shape {tuple(leaf.shape)} cannot be split: its dimension {dim} is "
            f"not divisible by mesh axes {axes} = {ways} ways (check the model.* sizes against "
            f"mesh.* degrees)")

  jax.tree_util.tree_map_with_path(check, abstract_params, shardings)


def validate(config, devices, process_count: int) -> None:
  """All checks that need no model: values, then the mesh against these devices."""
  check_values(config)
  check_mesh(config, devices, process_count)



# ---------------------------------------------------------------- command-line parsing
def load_config_file(spec: str):
  """Loads `path.py[:args]` the way --config does (a parse error's explanation, hf import's
  template)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_override(argv: list[str]) -> str | None:
  """Names the first --config.a.b override whose field does not exist, with close matches."""
  import difflib
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    i = argv.index("--config") if "--config" in argv else -1
    spec = argv[i + 1] if 0 <= i < len(argv) - 1 else None
  if spec is None:
    return None
  config = load_config_file(spec)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in dotted.split("."):
      if not hasattr(node, "keys") or part not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, known, n=3)
        where = ".".join(walked) or "the config"
        hint = f"; did you mean {', '.join(repr('.'.join(walked + [c])) for c in close)}?" if close \
            else ""
        return (f"{arg}: '{dotted}' is not a config field ({where} has no '{part}'){hint}"
                f"\n  fields of {where}: {', '.join(known)}")
      node, walked = node[part], walked + [part]
  return None


def _config_file_error(message: str) -> str:
  """config_flags reports an error raised by a config file's get_config (an unknown size=, a
  mistyped argument) with that file's whole traceback: keep the flag and the error's own line."""
  import re
  if "Traceback (most recent call last)" not in message:
    return message
  flag = re.match(r"flag (--\S+): Error", message)
  last = [line for line in message.splitlines() if line.strip()][-1].strip()
  kind, colon, text = last.partition(": ")
  last = text if colon and kind.isidentifier() else last  # 'ValueError: ...' -> '...'
  return f"{flag.group(1)}: {last}" if flag else last


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one clear line for config mistakes instead of a traceback."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a wrong type, a bad value or a bad config file: absl names the flag
    message = _config_file_error(str(e).strip())
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = _unknown_override(argv) or f"{type(e).__name__}: {e}"
  raise SystemExit(f"config error: {message}")
