"""Starts it all: the model, the engine, the routes, uvicorn; SIGTERM drains."""

import contextlib
import os
import signal
import time

import uvicorn

from foundation import generate as generate_lib
from foundation import mesh as mesh_lib
from foundation.serve import app as app_lib
from foundation.serve import engine as engine_lib


class _Uvicorn(uvicorn.Server):
  """uvicorn's server, which also tells the engine to drain on SIGTERM / Ctrl-C and prints the
  address it listens on once it does (with --port 0, the port it got)."""

  def __init__(self, config, engine, banner):
    super().__init__(config)
    self.engine, self.banner = engine, banner

  async def startup(self, sockets=None):
    await super().startup(sockets)
    if self.should_exit or not getattr(self, "servers", None):
      return
    host, port = self.servers[0].sockets[0].getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{host}:{port}  {self.banner}", flush=True)

  def handle_exit(self, sig, frame):
    # uvicorn then stops accepting connections and waits up to timeout_graceful_shutdown for the
    # running requests; the engine answers 503 to requests that arrive on open connections.
    if not self.should_exit:
      print(f"signal {signal.Signals(sig).name}: draining (no new requests; "
            f"{self.engine.running} running, {self.engine.queued} queued)", flush=True)
    self.engine.draining = True
    if self.should_exit and sig == signal.SIGINT:
      self.force_exit = True
    self.should_exit = True


def load_adapters(session, base_workdir: str, adapters: dict[str, str]):
  """{name: workdir} -> ({name: params for the engine}, {name: config}). See docs/serving.md."""
  if not adapters:
    return {}, {}
  from foundation.serve import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  return adapters_lib.load_all(session, base_workdir, adapters)


def run(args, adapters: dict[str, str], keys) -> int:
  started = time.monotonic()
  mesh_lib.initialize_distributed()
  session = generate_lib.load(args.workdir, args.step, args.override)
  if session.is_classifier:
    raise ValueError(f"--workdir {args.workdir}: a classifier (model.num_classes="
                     f"{session.config.model.num_classes}) has labels, not text to serve")
  adapter_params, adapter_configs = load_adapters(session, args.workdir, adapters)
  engine = engine_lib.Engine(session, slots=args.slots, queue_size=args.queue,
                             adapters=adapter_params)
  name = args.name or os.path.basename(os.path.normpath(args.workdir))
  limits = app_lib.Limits(max_body_bytes=args.max_body_bytes,
                          max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                          max_n=args.max_n)
  routes = app_lib.Server(session, engine, base_name=name, adapters=adapter_configs, keys=keys,
                          limits=limits)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    finished = engine.drain(timeout=1.0)  # uvicorn already waited for the running requests
    print("drained: every request finished" if finished
          else "drain timeout: the requests left were cancelled", flush=True)

  engine.start()
  engine.warm_up()
  template = routes.templates[""].kind
  print(f"{args.workdir}: step {session.step}, {session.model.cfg.n_layers} layers, context "
        f"{session.max_len}, {engine.slots} slots, chat template '{template}', "
        f"{mesh_lib.describe(session.mesh, session.config.mesh)}; ready in "
        f"{time.monotonic() - started:.1f} s", flush=True)
  if keys is None:
    banner = "(no --api-keys: listening on 127.0.0.1 only, every local request is allowed)"
  else:
    banner = f"({len(keys.keys)} API keys from {args.api_keys})"
  config = uvicorn.Config(routes.app(lifespan), host=args.host, port=args.port,
                          log_level="warning", timeout_graceful_shutdown=args.drain_timeout,
                          access_log=False)
  _Uvicorn(config, engine, banner).run()
  return 0
