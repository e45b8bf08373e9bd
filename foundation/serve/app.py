"""The HTTP routes: an OpenAI-style API over the engine, /health, /metrics and the Q&A page.

  GET  /                     the Q&A page (page.html)
  GET  /health               {"status": "ok" | "draining", running, queued, slots}
  GET  /metrics              Prometheus text format
  GET  /v1/models            the base model and each adapter, by the name `model` takes
  POST /v1/completions       prompt -> text; stream=true: server-sent events
  POST /v1/chat/completions  messages -> the assistant's reply, in the model's own chat template

Every error is one JSON object on one line, OpenAI's shape, naming the field:
  {"error": {"message": "max_tokens=5000 is over this server's cap of 512", "type":
   "invalid_request_error", "param": "max_tokens", "code": null}}
"""

import asyncio
import dataclasses
import json
import os
import secrets
import threading
import time

import prometheus_client as prom
prom.disable_created_metrics()
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from foundation import generate as generate_lib
from foundation.serve import engine as engine_lib
from foundation.serve import keys as keys_lib


@dataclasses.dataclass
class Limits:
  max_body_bytes: int = 1 << 20     # a request body over this: 413
  max_prompt_tokens: int = 0        # 0: the model's context - 1
  max_tokens: int = 512             # the cap on max_tokens (its default for chat: the room left)
  max_n: int = 8                    # the cap on n
  max_stop: int = 4                 # stop strings, as OpenAI allows


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.headers = headers or {}

  def response(self) -> JSONResponse:
    body = {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": None}}
    return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error_json(message: str, kind: str = "server_error") -> str:
  return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


class Metrics:
  """The Prometheus metrics of one server (its own registry)."""

  def __init__(self, engine):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("foundation_requests", "HTTP API requests by route and status",
                                 ["route", "status"], registry=r)
    self.prompt_tokens = prom.Counter("foundation_prompt_tokens", "Prompt tokens prefilled",
                                      registry=r)
    self.completion_tokens = prom.Counter("foundation_completion_tokens", "Tokens generated",
                                          registry=r)
    self.latency = prom.Histogram("foundation_request_seconds", "Request latency, whole answer",
                                  ["route"], registry=r, buckets=(
                                      .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64, 128))
    self.first_token = prom.Histogram("foundation_first_token_seconds",
                                      "Time to the first token", registry=r, buckets=(
                                          .01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16))
    prom.Gauge("foundation_queue_length", "Requests waiting for a slot", registry=r
               ).set_function(lambda: engine.queued)
    prom.Gauge("foundation_running", "Requests in a slot now", registry=r
               ).set_function(lambda: engine.running)
    prom.Gauge("foundation_slots", "Slots of the KV cache", registry=r
               ).set_function(lambda: engine.slots)
    prom.Gauge("foundation_batch_occupancy",
               "Mean share of the slots busy over the decode steps so far", registry=r
               ).set_function(lambda: engine.occupancy_sum / max(1, engine.steps) / engine.slots)
    prom.Gauge("foundation_cancelled_requests",
               "Requests whose slot was freed early (client gone, stop string, shutdown)",
               registry=r).set_function(lambda: engine.cancelled)
    prom.Gauge("foundation_decode_steps", "Decode steps run so far", registry=r
               ).set_function(lambda: engine.steps)


class Server:
  """The routes, holding the engine, the keys, the chat template and the limits."""

  def __init__(self, session, engine, *, base_name: str, adapters=(), keys=None,
               limits: Limits = Limits()):
    self.session, self.engine, self.keys, self.limits = session, engine, keys, limits
    self.tokenizer = session.tokenizer
    self.base_name = base_name
    self.models = {base_name: ""}
    self.models.update({name: name for name in adapters})
    self.templates = {"": generate_lib.ChatTemplate.of(session.config, session.tokenizer)}
    for name, config in dict(adapters).items():
      self.templates[name] = generate_lib.ChatTemplate.of(config, session.tokenizer)
    self.max_len = session.max_len
    self.max_prompt = min(limits.max_prompt_tokens or self.max_len - 1, self.max_len - 1)
    self.metrics = Metrics(engine)
    self.created = int(time.time())
    self._mailbox = None
    with open(os.path.join(os.path.dirname(__file__), "page.html"), encoding="utf-8") as f:
      self.page = f.read()

  def routes(self):
    return [Route("/", self.index), Route("/health", self.health),
            Route("/metrics", self.prometheus),
            Route("/v1/models", self.list_models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]

  def app(self, lifespan=None) -> Starlette:
    return Starlette(routes=self.routes(), lifespan=lifespan)

  # ------------------------------------------------------------------ plain routes

  async def index(self, request: Request):
    return HTMLResponse(self.page)

  async def health(self, request: Request):
    status = "draining" if self.engine.draining else "ok"
    if self.engine.error is not None:
      status = "error"
    body = {"status": status, "running": self.engine.running, "queued": self.engine.queued,
            "slots": self.engine.slots}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)

  async def prometheus(self, request: Request):
    return Response(prom.generate_latest(self.metrics.registry),
                    media_type=prom.CONTENT_TYPE_LATEST)

  async def list_models(self, request: Request):
    try:
      self.authorize(request)
    except ApiError as e:
      return e.response()
    data = [{"id": name, "object": "model", "created": self.created, "owned_by": "foundation",
             **({"parent": self.base_name} if adapter else {})}
            for name, adapter in self.models.items()]
    return JSONResponse({"object": "list", "data": data})

  # ------------------------------------------------------------------ checks

  def authorize(self, request: Request) -> None:
    if self.keys is None:
      return
    header = request.headers.get("authorization", "")
    if not header:
      raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'",
                     "authorization", "authentication_error")
    scheme, _, key = header.partition(" ")
    found = self.keys.find(key.strip()) if scheme.lower() == "bearer" else None
    if found is None:
      raise ApiError(401, "the API key is not valid", "authorization", "authentication_error")
    wait = found.take()
    if wait > 0:
      seconds = keys_lib.retry_after_seconds(wait)
      raise ApiError(429, f"rate limit of {found.rpm:g} requests per minute reached for key "
                          f"{found.name!r}; retry in {seconds} s", None, "rate_limit_error",
                     {"Retry-After": str(seconds)})

  async def read_json(self, request: Request) -> dict:
    cap = self.limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
      raise ApiError(413, f"the request body is {int(length)} bytes, over this server's limit "
                          f"of {cap} bytes", "body")
    body = bytearray()
    try:
      async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
          raise ApiError(413, f"the request body is over this server's limit of {cap} bytes",
                         "body")
    except ClientDisconnect:
      raise ApiError(400, "the client went away before its request was read", "body") from None
    try:
      value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f"the body is not valid JSON: {e}", "body") from None
    if not isinstance(value, dict):
      raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}", "body")
    return value

  def adapter_of(self, body: dict) -> str:
    name = body.get("model", self.base_name)
    if not isinstance(name, str) or name not in self.models:
      raise ApiError(404, f"model {name!r} is not served here; models: "
                          f"{', '.join(self.models)}", "model", "not_found_error")
    return self.models[name]

  def sampling(self, body: dict) -> dict:
    """temperature, top_p, top_k, n, seed, stop: checked, with OpenAI's defaults."""
    out = {"temperature": _number(body, "temperature", 1.0, 0, 2),
           "top_p": _number(body, "top_p", 1.0, 0, 1, low_open=True),
           "top_k": _integer(body, "top_k", 0, 0, None),
           "n": _integer(body, "n", 1, 1, self.limits.max_n, cap="this server's cap")}
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
      raise ApiError(400, f"seed must be an integer, got {json.dumps(seed)[:40]}", "seed")
    out["seed"] = seed
    stop = body.get("stop")
    if stop is None:
      stop = []
    elif isinstance(stop, str):
      stop = [stop]
    if (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > self.limits.max_stop):
      raise ApiError(400, f"stop must be a non-empty string or a list of at most "
                          f"{self.limits.max_stop} of them", "stop")
    out["stop"] = stop
    for name in ("presence_penalty", "frequency_penalty"):
      if body.get(name) not in (None, 0, 0.0):
        raise ApiError(400, f"{name} is not supported by this server (0 or absent)", name)
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix"):
      if body.get(name) not in (None, False, {}, []):
        raise ApiError(400, f"{name} is not supported by this server", name)
    if body.get("echo"):
      raise ApiError(400, "echo is not supported by this server", "echo")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise ApiError(400, "stream must be true or false", "stream")
    out["stream"] = stream
    return out

  def check_prompt(self, ids: list[int], field: str) -> None:
    if not ids:
      raise ApiError(400, f"{field} is empty", field)
    if len(ids) > self.max_prompt:
      raise ApiError(400, f"{field} is {len(ids)} tokens long, over this server's limit of "
                          f"{self.max_prompt} (the model's context is {self.max_len} tokens)",
                     field)

  def max_tokens(self, body: dict, default: int) -> int:
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = body.get(field)
    if value is None:
      return min(default, self.limits.max_tokens)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ApiError(400, f"{field} must be a positive integer, got {json.dumps(value)[:40]}",
                     field)
    if value > self.limits.max_tokens:
      raise ApiError(400, f"{field}={value} is over this server's cap of "
                          f"{self.limits.max_tokens}", field)
    return value

  # ------------------------------------------------------------------ the API

  async def completions(self, request: Request):
    return await self._serve(request, chat=False)

  async def chat_completions(self, request: Request):
    return await self._serve(request, chat=True)

  async def _serve(self, request: Request, chat: bool):
    route = "chat" if chat else "completions"
    started = time.monotonic()
    try:
      self.authorize(request)
      body = await self.read_json(request)
      adapter = self.adapter_of(body)
      params = self.sampling(body)
      if chat:
        template = self.templates[adapter]
        prompt = self.tokenize_messages(body.get("messages"), template)
        stop_texts = list(params["stop"]) + list(template.stop_texts)
      else:
        prompt = self.tokenize_prompt(body.get("prompt"))
        stop_texts = list(params["stop"])
      max_tokens = self.max_tokens(body, self.limits.max_tokens if chat else 16)
      name = body.get("model", self.base_name)
      jobs = self.submit(prompt, adapter, params, max_tokens)
    except ApiError as e:
      self.metrics.requests.labels(route, str(e.status)).inc()
      return e.response()
    self.metrics.prompt_tokens.inc(len(prompt) * params["n"])
    answer = Answer(self, jobs, stop_texts, chat, name, len(prompt))
    if params["stream"]:
      include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
      return StreamingResponse(answer.events(include_usage, route, started),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
      result = await answer.whole(request)
    except ApiError as e:
      self.metrics.requests.labels(route, str(e.status)).inc()
      return e.response()
    self.metrics.requests.labels(route, "200").inc()
    self.metrics.latency.labels(route).observe(time.monotonic() - started)
    return JSONResponse(result)

  def tokenize_prompt(self, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
      prompt = prompt[0]  # the openai client may send one prompt as a one-item list
    if isinstance(prompt, str):
      ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
      vocab = self.session.model.cfg.vocab_size
      bad = next((t for t in prompt if not 0 <= t < vocab), None)
      if bad is not None:
        raise ApiError(400, f"prompt token {bad} is outside the vocabulary [0, {vocab})",
                       "prompt")
      ids = list(prompt)
    else:
      raise ApiError(400, "prompt must be a string or a list of token ids (one prompt a request)",
                     "prompt")
    self.check_prompt(ids, "prompt")
    return ids

  def tokenize_messages(self, messages, template) -> list[int]:
    if not isinstance(messages, list) or not messages:
      raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                     "messages")
    clean = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise ApiError(400, f"messages[{i}] must have role system, user or assistant",
                       f"messages[{i}].role")
      content = m.get("content")
      if isinstance(content, list):  # the content-parts form: its text parts
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
          raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                         f"messages[{i}].content")
        content = "".join(str(p.get("text", "")) for p in content)
      if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
      clean.append({"role": m["role"], "content": content})
    if clean[-1]["role"] != "user":
      raise ApiError(400, "the last message must be the user's", "messages")
    try:
      ids = template.prompt_ids(clean)
    except ValueError as e:
      raise ApiError(400, str(e), "messages") from None
    self.check_prompt(ids, "messages")
    return ids

  def mailbox(self, loop) -> "Mailbox":
    if self._mailbox is None or self._mailbox.loop is not loop:
      self._mailbox = Mailbox(loop)
    return self._mailbox

  def submit(self, prompt, adapter, params, max_tokens) -> list["Job"]:
    base_seed = params["seed"]
    if base_seed is None:
      base_seed = secrets.randbits(31)
    jobs = []
    try:
      for i in range(params["n"]):
        job = Job(self.mailbox(asyncio.get_running_loop()))
        job.request = engine_lib.Request(
            prompt, max_tokens, temperature=params["temperature"], top_k=params["top_k"],
            top_p=params["top_p"], seed=(base_seed + i) % (1 << 32),
            stop_tokens=(self.tokenizer.eos_id,), adapter=adapter, on_event=job.on_event)
        self.engine.submit(job.request)
        jobs.append(job)
    except engine_lib.QueueFull as e:
      for job in jobs:
        job.request.cancel()
      raise ApiError(503, f"{e}; retry shortly", None, "overloaded_error",
                     {"Retry-After": "1"}) from None
    except engine_lib.Draining as e:
      for job in jobs:
        job.request.cancel()
      raise ApiError(503, str(e), None, "overloaded_error") from None
    except ValueError as e:  # the prompt and the context (checked again by the engine)
      raise ApiError(400, str(e), "prompt") from None
    except RuntimeError as e:  # the decode loop failed: /health says so too
      raise ApiError(500, str(e).splitlines()[0], None, "server_error") from None
    return jobs


class Mailbox:
  """Events from the engine's thread to the jobs on the event loop: appended under a lock and
  handed over in one loop callback per batch (one wake-up of the loop per decode step, not one
  per token)."""

  def __init__(self, loop):
    self.loop = loop
    self._lock = threading.Lock()
    self._pending: list = []

  def post(self, job: "Job", event) -> None:  # the engine's thread
    with self._lock:
      self._pending.append((job, event))
      first = len(self._pending) == 1
    if first:
      self.loop.call_soon_threadsafe(self._deliver)

  def _deliver(self) -> None:
    with self._lock:
      pending, self._pending = self._pending, []
    for job, event in pending:
      job.events.put_nowait(event)


class Job:
  """One choice: the engine's request and the events it sends back (to this event loop)."""

  def __init__(self, mailbox: Mailbox):
    self.mailbox = mailbox
    self.events: asyncio.Queue = asyncio.Queue()
    self.request = None

  def on_event(self, event) -> None:  # the engine's thread
    self.mailbox.post(self, event)


class Text:
  """The text of one choice, grown token by token: what is safe to send so far (never a partial
  UTF-8 character, never the start of a stop string), and where a stop string ends it."""

  def __init__(self, tokenizer, stop_texts):
    self.tokenizer, self.stop_texts = tokenizer, stop_texts
    self.ids: list[int] = []
    self.sent = 0
    self.stopped = False

  def add(self, token: int) -> str:
    self.ids.append(token)
    return self._delta(final=False)

  def finish(self) -> str:
    return self._delta(final=True)

  def _delta(self, final: bool) -> str:
    text = self.tokenizer.decode(self.ids)
    cut = min((i for i in (text.find(s) for s in self.stop_texts) if i >= 0), default=-1)
    if cut >= 0:
      text, final, self.stopped = text[:cut], True, True
    end = len(text)
    if not final:
      while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete character so far
        end -= 1
      for stop in self.stop_texts:  # hold back what may be the start of a stop string
        for k in range(min(len(stop) - 1, end), 0, -1):
          if text[:end].endswith(stop[:k]):
            end = min(end, len(text[:end]) - k)
            break
    end = max(end, self.sent)
    delta, self.sent = text[self.sent:end], end
    return delta

  @property
  def text(self) -> str:
    text = self.tokenizer.decode(self.ids)
    return text[:self.sent] if self.stopped else text


class Answer:
  """The choices of one API request, streamed as server-sent events or returned whole."""

  def __init__(self, server: Server, jobs, stop_texts, chat: bool, model: str, prompt_len: int):
    self.server, self.jobs, self.chat, self.model = server, jobs, chat, model
    self.prompt_len = prompt_len
    self.texts = [Text(server.tokenizer, stop_texts) for _ in jobs]
    self.finish = [None] * len(jobs)
    self.tokens = [0] * len(jobs)
    self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    self.created = int(time.time())

  def cancel(self) -> None:
    for job in self.jobs:
      job.request.cancel()

  async def _next(self):
    """(choice index, delta text) as tokens arrive; (index, None) when that choice ends."""
    pending = {asyncio.ensure_future(job.events.get()): i for i, job in enumerate(self.jobs)}
    try:
      while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
          i = pending.pop(future)
          kind, value = future.result()
          if kind == "token":
            self.tokens[i] += 1
            delta = self.texts[i].add(value)
            if self.texts[i].stopped:  # a stop string: the rest is not needed
              self.jobs[i].request.cancel()
              self.finish[i] = "stop"
              yield i, delta
              yield i, None
              continue
            pending[asyncio.ensure_future(self.jobs[i].events.get())] = i
            if delta:
              yield i, delta
          else:
            if value == "error":
              raise RuntimeError(f"the decode loop failed: {self.server.engine.error}")
            if self.finish[i] is None:
              self.finish[i] = "stop" if value in ("stop", "cancelled") else "length"
            yield i, self.texts[i].finish()
            yield i, None
    finally:
      for future in pending:
        future.cancel()

  def usage(self) -> dict:
    completion = sum(self.tokens)
    prompt = self.prompt_len  # as OpenAI counts it: once, whatever n
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}

  def _chunk(self, i: int, delta: str | None, finish: str | None, first: bool) -> dict:
    if self.chat:
      content = {"role": "assistant", "content": delta or ""} if first else (
          {"content": delta} if delta else {})
      choice = {"index": i, "delta": content, "finish_reason": finish}
      kind = "chat.completion.chunk"
    else:
      choice = {"index": i, "text": delta or "", "finish_reason": finish}
      kind = "text_completion"
    return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
            "choices": [choice]}

  async def events(self, include_usage: bool, route: str, started: float):
    metrics = self.server.metrics
    status = "200"
    first_seen = [True] * len(self.jobs)
    any_token = False
    try:
      async for i, delta in self._next():
        if delta is None:
          chunk = self._chunk(i, None, self.finish[i], False)
        elif not delta and not first_seen[i]:
          continue
        else:
          if delta and not any_token:
            any_token = True
            metrics.first_token.observe(time.monotonic() - started)
          chunk = self._chunk(i, delta, None, first_seen[i])
          first_seen[i] = False
        yield f"data: {json.dumps(chunk)}\n\n"
      if include_usage:
        usage = {"id": self.id, "object": "chat.completion.chunk" if self.chat
                 else "text_completion", "created": self.created, "model": self.model,
                 "choices": [], "usage": self.usage()}
        yield f"data: {json.dumps(usage)}\n\n"
      yield "data: [DONE]\n\n"
    except asyncio.CancelledError:  # the client went away: free the slots at once
      status = "499"
      raise
    except Exception as e:  # pylint: disable=broad-except
      status = "500"
      yield f"data: {_error_json(str(e).splitlines()[0] if str(e) else type(e).__name__)}\n\n"
    finally:
      self.cancel()
      metrics.requests.labels(route, status).inc()
      metrics.completion_tokens.inc(sum(self.tokens))
      metrics.latency.labels(route).observe(time.monotonic() - started)

  async def whole(self, request: Request) -> dict:
    """Waits for every choice; a client that goes away meanwhile frees the slots."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
      consume = asyncio.ensure_future(self._consume())
      done, _ = await asyncio.wait({consume, watcher}, return_when=asyncio.FIRST_COMPLETED)
      if consume not in done:
        consume.cancel()
        self.cancel()
        raise ApiError(499, "the client went away", None, "client_closed")
      try:
        await consume
      except RuntimeError as e:
        raise ApiError(500, str(e).splitlines()[0], None, "server_error") from None
    finally:
      watcher.cancel()
      self.cancel()
    self.server.metrics.completion_tokens.inc(sum(self.tokens))
    choices = []
    for i, text in enumerate(self.texts):
      if self.chat:
        choices.append({"index": i, "message": {"role": "assistant", "content": text.text},
                        "finish_reason": self.finish[i]})
      else:
        choices.append({"index": i, "text": text.text, "finish_reason": self.finish[i]})
    return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices,
            "usage": self.usage()}

  async def _consume(self):
    async for _ in self._next():
      pass


async def _wait_disconnect(request: Request) -> None:
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      return


def _number(body, field, default, low, high, low_open=False):
  value = body.get(field)
  if value is None:
    return float(default)
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise ApiError(400, f"{field} must be a number, got {json.dumps(value)[:40]}", field)
  if value < low or value > high or (low_open and value == low):
    interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
    raise ApiError(400, f"{field}={value} must be in {interval}", field)
  return float(value)


def _integer(body, field, default, low, high, cap="the limit"):
  value = body.get(field)
  if value is None:
    return default
  if not isinstance(value, int) or isinstance(value, bool):
    raise ApiError(400, f"{field} must be an integer, got {json.dumps(value)[:40]}", field)
  if value < low:
    raise ApiError(400, f"{field}={value} must be at least {low}", field)
  if high is not None and value > high:
    raise ApiError(400, f"{field}={value} is over {cap} of {high}", field)
  return value
