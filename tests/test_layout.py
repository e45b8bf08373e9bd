"""The package's layout rules, read from the import statements (all of them, also those inside
functions): nothing under foundation/ imports configs/, and the modules import each other without
a cycle, so each can be read (and tested) after the ones below it."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "foundation")


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str, modules: set[str]) -> set[str]:
  """The project modules `path` imports (`from foundation import x` counts as foundation.x when
  that is a module, else as the package)."""
  name = module_name(path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from . import x
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.add(full if full in modules else base)
  return {m for m in found if m in modules or m.split(".")[0] == "configs"}


def graph() -> dict[str, set[str]]:
  paths = [os.path.join(d, f) for d, _, files in os.walk(PACKAGE) for f in files
           if f.endswith(".py")]
  modules = {module_name(p) for p in paths}
  return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def test_the_library_imports_no_config_file():
  offenders = {m: sorted(i for i in deps if i.split(".")[0] == "configs")
               for m, deps in graph().items()}
  assert not {m: d for m, d in offenders.items() if d}


def test_the_modules_import_each_other_without_a_cycle():
  edges = graph()
  # A package's __init__ importing its own modules is how Python loads it, not a cycle.
  edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in edges.items()}
  state, cycles = {}, []

  def visit(node, path):
    state[node] = "open"
    for dep in sorted(edges.get(node, ())):
      if state.get(dep) == "open":
        cycles.append(path[path.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, path + [dep])
    state[node] = "done"

  for module in sorted(edges):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
