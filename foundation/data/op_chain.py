"""The grammar of a preprocessing chain, shared by the image and audio ops: 'a|b(1, x=2)', each
piece an op name or a call with literal arguments."""

import ast
import difflib
from typing import Mapping


def parse(spec: str, ops: Mapping, field: str = "pp") -> list[tuple[str, tuple, dict]]:
  """'a|b(1, x=2)' -> [('a', (), {}), ('b', (1,), {'x': 2})], every name one of `ops`; a piece
  that is not a call or an unknown name is a ValueError naming the op and the field."""
  chain = []
  for piece in filter(None, (p.strip() for p in spec.split("|"))):
    try:
      call = ast.parse(piece, mode="eval").body
      if isinstance(call, ast.Name):
        name, args, kwargs = call.id, (), {}
      elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
        name = call.func.id
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
      else:
        raise ValueError
    except (SyntaxError, ValueError):
      raise ValueError(f"{field}={spec!r}: {piece!r} is not an op (name or name(literal args))"
                       ) from None
    if name not in ops:
      close = difflib.get_close_matches(name, ops, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(f"{field}={spec!r}: unknown op {name!r}; {hint}ops: {', '.join(ops)}")
    chain.append((name, args, kwargs))
  return chain
