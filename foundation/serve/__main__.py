"""python -m foundation.serve --workdir DIR [--host --port --api-keys FILE --adapters NAME=WORKDIR,...]

Serves a workdir's model over HTTP (docs/serving.md): an OpenAI-style API with continuous
batching, /health, /metrics and a Q&A page at /. Without --api-keys it listens on 127.0.0.1 only.
SIGTERM (or Ctrl-C) stops taking requests and lets the running ones finish (--drain-timeout).
"""

import argparse
import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m foundation.serve", description=__doc__.split("\n")[2])
  p.add_argument("--workdir", required=True, help="a run's workdir: config.json + checkpoints/")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on; anything but loopback needs --api-keys")
  p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
  p.add_argument("--api-keys", default="", help="keys file: SHA-256 of each key, a name, rpm=N "
                 "(python -m foundation.serve.keys add)")
  p.add_argument("--rpm", type=float, default=0,
                 help="requests per minute for keys whose line gives no rpm= (0: no limit)")
  p.add_argument("--adapters", default="",
                 help="NAME=WORKDIR,...: LoRA workdirs of this base, chosen by the request's model")
  p.add_argument("--name", default="", help="the base model's name in `model` (default: the "
                 "workdir's folder name)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--override", action="append", default=[],
                 help="a config field of the workdir, e.g. mesh.fsdp=1 (repeatable)")
  p.add_argument("--slots", type=int, default=16, help="requests decoded together (KV cache rows)")
  p.add_argument("--queue", type=int, default=256, help="requests that may wait for a slot")
  p.add_argument("--max-tokens", type=int, default=512, help="the cap on a request's max_tokens")
  p.add_argument("--max-n", type=int, default=8, help="the cap on a request's n")
  p.add_argument("--max-prompt-tokens", type=int, default=0,
                 help="the cap on a prompt's tokens (0: the model's context - 1)")
  p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the cap on a request body")
  p.add_argument("--drain-timeout", type=float, default=30,
                 help="seconds SIGTERM waits for running requests")
  args = p.parse_args(argv)
  for field in ("slots", "queue", "max_tokens", "max_n", "max_body_bytes"):
    if getattr(args, field) < 1:
      p.error(f"--{field.replace('_', '-')}={getattr(args, field)} must be at least 1")
  if args.host not in LOOPBACK and not args.api_keys:
    p.error(f"--host {args.host}: listening beyond this machine needs --api-keys FILE (without "
            f"keys the server listens on 127.0.0.1 only)")
  return args, p


def parse_adapters(text: str, parser) -> dict[str, str]:
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, workdir = item.partition("=")
    if not sep or not name or not workdir:
      parser.error(f"--adapters {item!r}: give NAME=WORKDIR (comma-separated)")
    if name in out:
      parser.error(f"--adapters: the name {name!r} is given twice")
    if not os.path.exists(os.path.join(workdir, "config.json")):
      parser.error(f"--adapters {item}: no config.json in {workdir} (a LoRA run's workdir)")
    out[name] = workdir
  return out


def main(argv=None) -> int:
  args, parser = parse_args(sys.argv[1:] if argv is None else argv)
  adapters = parse_adapters(args.adapters, parser)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a restore at INFO
  from foundation.serve import server  # pylint: disable=g-import-not-at-top
  from foundation.serve import keys as keys_lib  # pylint: disable=g-import-not-at-top
  try:
    keys = keys_lib.Keys.read(args.api_keys, args.rpm) if args.api_keys else None
    return server.run(args, adapters, keys)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
