"""The continuous-batching decode loop: a fixed number of slots in one KV cache.

  engine = Engine(session, slots=16, queue_size=256)
  engine.start()                            # a background thread runs the loop
  request = engine.submit(Request(prompt_ids, max_tokens=64, ...), on_event)
  ...                                       # on_event(('token', id)) ... ('done', reason)
  request.cancel()                          # a client that went away: its slot is freed at once
  engine.drain(timeout=30)                  # stop taking requests, finish the running ones

One KV cache holds `slots` rows, each with its own write index; the slot axis is split over the
mesh's data-parallel axes like a training batch (vmap's spmd_axis_name), the params keep their
training shardings. The decoding forward is the model's own modules run layer by layer on a cache
laid out for decoding (`Engine._row_cache`, `_attention`), one row vmapped over the slots. With
LoRA adapters (foundation/serve/adapters.py) the base params are held once and an adapter's
leaves are merged into them inside the jitted step. Each turn of the loop:

  1. admits waiting requests into free slots, at most `prefill_per_step` of them: each prompt is
     prefilled alone (right-padded to a power-of-two bucket, so few lengths compile) into a
     fresh row of the cache, and its first token is sampled from the prefill's logits;
  2. runs ONE decode step for all slots at once (a free slot computes too, its result unread;
     with adapters, one step per adapter that has running rows);
  3. hands each running request its new token, and frees the slots whose request finished (a stop
     token, its max_tokens, the context full) or was cancelled.

So requests join and leave between steps and a long answer never holds up a short one. Every row
is computed on its own (its own cache row, its own rotary positions, its own sampling key), so a
request's tokens do not depend on what else runs beside it: greedy output is the same alone or
batched (tests/test_serve.py checks it).

Sampling parameters are per row (temperature 0 is greedy; top_k, top_p as generate.Sampling). A
request's randomness is jax.random.key(seed) folded with the token's index, so a seeded request
gives the same text whatever runs beside it.
"""

import dataclasses
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from foundation import generate as generate_lib
from foundation import lora
from foundation import mesh as mesh_lib
from foundation.models import layers
from foundation.models import transformer


class QueueFull(Exception):
  """The bounded queue of waiting requests is full (the server answers 503)."""


class Draining(Exception):
  """The engine is stopping (SIGTERM) and takes no new requests (the server answers 503)."""


@dataclasses.dataclass
class Request:
  """One sequence to generate. Events go to `on_event` from the engine's thread:
  ('token', id) for each new token (a stop token is not sent), then ('done', reason) with reason
  'stop' (a stop token), 'length' (max_tokens or the context), 'cancelled' or 'error' (the
  loop failed; Engine.error says why)."""
  prompt: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()
  adapter: str = ""            # '' is the base model; else a name given to --adapters
  on_event: Callable | None = None
  # Set by the engine:
  submitted: float = 0.0
  started: float = 0.0         # when its prefill ran
  generated: int = 0
  cancelled: bool = False

  def cancel(self) -> None:
    """Frees the request's slot before the next decode step (a client that went away)."""
    self.cancelled = True


def _no_batch_rules(axis_rules):
  """The rules with the logical 'batch' axis unsplit: each slot's row (batch 1) is computed whole
  on its slot's devices; the slot axis itself is split by vmap's spmd_axis_name."""
  return tuple((name, None if name == "batch" else axes) for name, axes in axis_rules)


def sample_rows(logits, temperature, top_k, top_p, keys):
  """Per-row sampling: logits float32 [S, V]; temperature, top_p float32 [S]; top_k int32 [S]
  (0: all); keys [S] typed PRNG keys. Temperature 0 is greedy (argmax). The same rules as
  generate.sample_logits (top_k, then top_p over what is left), each row with its own settings."""
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
  scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  ordered = jnp.where(jnp.arange(vocab)[None] < k[:, None], ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  keep = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
  threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
  sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled)
  return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


@dataclasses.dataclass
class _Slot:
  request: Request | None = None
  position: int = 0      # the rotary position of the token the next decode step feeds
  last_token: int = 0    # the token the next decode step feeds


class Engine:
  """The decode loop over `slots` rows of one KV cache (see the module docstring)."""

  def __init__(self, session, slots: int = 16, queue_size: int = 256, prefill_per_step: int = 4,
               adapters: dict | None = None):
    self.session = session
    self.model = session.model
    self.cfg = session.model.cfg
    self.mesh = session.mesh
    self.rules = _no_batch_rules(session.axis_rules)
    batch_axes = nn.logical_to_mesh_axes(("batch",), session.axis_rules)[0]
    self.batch_axes = (None if batch_axes is None else
                       (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
    dp = mesh_lib.data_parallel_degree(session.mesh, session.axis_rules)
    self.slots = -(-slots // dp) * dp  # the slot axis splits evenly over the data-parallel axes
    self.max_len = session.max_len
    # A prompt's prefill writes bucket(n) columns (the prompt, then padding the answer
    # overwrites); prompt and answer together are at most max_len tokens.
    self.cache_len = max(self.max_len, generate_lib.bucket(self.max_len - 1))
    self.prefill_per_step = prefill_per_step
    # The base params once; per adapter name only (its lora_a/lora_b leaves, lora.alpha).
    self.base = session.params
    self.adapters = {"": (None, 0.0)}
    self.adapters.update(adapters or {})
    self.waiting: queue.Queue = queue.Queue(maxsize=queue_size)
    self.rows = [_Slot() for _ in range(self.slots)]
    self.draining = False
    self.stopped = threading.Event()
    self._wake = threading.Event()
    self._thread = None
    self.error: BaseException | None = None
    # Counters for /metrics (read from other threads: plain ints and floats).
    self.steps = 0
    self.tokens_generated = 0
    self.prompt_tokens = 0
    self.occupancy_sum = 0
    self.cancelled = 0
    self._cache = None
    # The slot axis (the first of every cache array) is split like a training batch.
    self.cache_sharding = jax.sharding.NamedSharding(session.mesh, jax.P(self.batch_axes))
    replicated = jax.sharding.NamedSharding(session.mesh, jax.P())
    self._decode = jax.jit(self._decode_fn, donate_argnums=(3,),
                           out_shardings=(replicated, self.cache_sharding))
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(3,),
                            out_shardings=(replicated, self.cache_sharding))

  # ------------------------------------------------------------------ the jitted steps

  def _context(self):
    return _Context(self.mesh, self.rules)

  def _row_cache(self) -> dict:
    """One row's empty cache: {'k': per layer [K, H, C], 'v': per layer [K, C, H],
    'segment_ids': [C] (0: empty or padding), 'index': int32 scalar (the next column)}.

    The layout is for decoding: keys with the column last and values with it second, so both
    attention products are plain batched matmuls over the columns, without the transpose of the
    whole cache per layer and step that the model's [B, C, K, H] layout costs in XLA on a CPU;
    one array per layer (not the model's [layers, ...] stack) so each is updated in place."""
    cfg, c = self.cfg, self.cache_len
    zeros = lambda shape: jnp.zeros(shape, cfg.compute_dtype)
    return {"k": [zeros((cfg.n_kv_heads, cfg.head_dim, c)) for _ in range(cfg.n_layers)],
            "v": [zeros((cfg.n_kv_heads, c, cfg.head_dim)) for _ in range(cfg.n_layers)],
            "segment_ids": jnp.zeros((c,), jnp.int32), "index": jnp.zeros((), jnp.int32)}

  def _empty_cache(self):
    with self._context():
      return jax.jit(lambda: jax.vmap(lambda _: self._row_cache())(jnp.arange(self.slots)),
                     out_shardings=self.cache_sharding)()

  def _layer_params(self, params, i: int):
    if "layers" in params:  # scan_layers: every leaf has a leading layer axis
      return jax.tree.map(lambda a: a[i], params["layers"])
    return params[f"layers_{i}"]

  def _attention(self, p, x, positions, segments, k_row, v_row, seg_row, index):
    """layers.Attention's decoding path for one row, on this engine's cache layout: x [1, T, D]
    (the T new tokens, written at columns index..index+T-1) -> ([1, T, D], k_row, v_row).
    The same projections (layers.Dense: biases and LoRA included), rotary embeddings, mask rule
    (layers.cached_attention_mask) and float32 softmax as jax.nn.dot_product_attention's."""
    cfg = self.cfg
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    bias = cfg.qkv_bias
    dense = lambda features, names, name, **kw: layers.Dense(
        cfg, features, names, name=name, **kw).apply({"params": p[name]}, x)
    q = dense((n, h), ("embed", "heads", "head_dim"), "q", use_bias=bias)
    new_k = dense((k, h), ("embed", "kv_heads", "head_dim"), "k", use_bias=bias)
    new_v = dense((k, h), ("embed", "kv_heads", "head_dim"), "v", use_bias=bias)
    inv_freq = layers.inverse_frequencies(cfg)
    q = layers.rotary(q, positions, cfg.rope_theta, inv_freq)[0]            # [T, N, H]
    new_k = layers.rotary(new_k, positions, cfg.rope_theta, inv_freq)[0]    # [T, K, H]
    t = q.shape[0]
    k_row = jax.lax.dynamic_update_slice(
        k_row, new_k.transpose(1, 2, 0).astype(k_row.dtype), (0, 0, index))
    v_row = jax.lax.dynamic_update_slice(
        v_row, new_v[0].transpose(1, 0, 2).astype(v_row.dtype), (0, index, 0))
    q = q.reshape(t, k, n // k, h).transpose(1, 2, 0, 3)                      # [K, G, T, H]
    logits = jnp.einsum("kgth,khc->kgtc", q, k_row, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(h ** -0.5)
    mask = layers.cached_attention_mask(segments, seg_row[None], index, cfg.sliding_window)
    logits = jnp.where(mask[0], logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
    probs = jax.nn.softmax(logits, axis=-1).astype(v_row.dtype)
    out = jnp.einsum("kgtc,kch->kgth", probs, v_row)
    out = out.transpose(2, 0, 1, 3).reshape(1, t, n, h)
    out = layers.Dense(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2,
                       name="o").apply({"params": p["o"]}, out)
    return out, k_row, v_row

  def _forward(self, params, row, tokens, positions, segments, last=None):
    """Transformer.__call__ with a cache, for one row: tokens, positions, segments [1, T]
    written at row['index']. Returns (float32 logits [vocab] of column `last` (default: the
    last one), the updated row with its index moved on by T)."""
    cfg, index = self.cfg, row["index"]
    x = layers.Embed(cfg).apply({"params": params["embed"]}, tokens)
    seg_row = jax.lax.dynamic_update_slice(row["segment_ids"], segments[0].astype(jnp.int32),
                                           (index,))
    keys, values = [], []
    for i in range(cfg.n_layers):
      p = self._layer_params(params, i)
      h = layers.RMSNorm(cfg).apply({"params": p["attn_norm"]}, x)
      h, k_row, v_row = self._attention(p["attn"], h, positions, segments, row["k"][i],
                                        row["v"][i], seg_row, index)
      x = x + h
      x = x + layers.Mlp(cfg).apply({"params": p["mlp"]},
                                    layers.RMSNorm(cfg).apply({"params": p["mlp_norm"]}, x))
      keys.append(k_row)
      values.append(v_row)
    x = x[:, -1:] if last is None else jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1)
    x = layers.RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    logits = transformer.output_logits(cfg, params, x)
    return logits[0, -1], {"k": keys, "v": values, "segment_ids": seg_row,
                           "index": index + jnp.int32(tokens.shape[1])}

  @staticmethod
  def _params(base, adapter, alpha):
    """The params a request is decoded with: the base, or the base with an adapter merged in
    (inside the jitted step: the merged kernels are transient, never a stored copy)."""
    if adapter is None:
      return base
    return lora.merge(lora.attach(base, adapter), alpha)

  def _prefill_fn(self, base, adapter, alpha, cache, slot, tokens, segments, temperature, top_k,
                  top_p, seed):
    """Prefills one right-padded prompt [1, P] into row `slot`; returns (first token, cache).

    The prompt's n tokens take columns 0..n-1 (the padding after them has segment id 0: never
    attended to) and the row's next write is column n, so a row of max(context, largest bucket)
    columns holds any request."""
    params = self._params(base, adapter, alpha)
    n = jnp.sum(segments, dtype=jnp.int32)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, row = self._forward(params, self._row_cache(), tokens, positions, segments, n - 1)
    row["index"] = n
    cache = jax.tree.map(lambda whole, one: whole.at[slot].set(one), cache, row)
    first = sample_rows(logits[None], temperature[None], top_k[None], top_p[None],
                        jax.random.fold_in(jax.random.key(seed), 0)[None])
    return first[0], cache

  def _decode_fn(self, base, adapter, alpha, cache, active, tokens, positions, temperature, top_k,
                 top_p, seeds, counts):
    """One decode step: tokens, positions int32 [S] -> (next tokens [S], cache).

    Only the `active` rows [S] (bool) move on. An inactive row (a free slot, or one of another
    adapter) feeds its token with segment id 0, which nothing ever attends to, and keeps its
    write index: its column is overwritten by its next real token."""
    params = self._params(base, adapter, alpha)

    def one(row, live, token, position):
      segment = live.astype(jnp.int32)[None, None]
      logits, new = self._forward(params, row, token[None, None], position[None, None], segment)
      new["index"] = jnp.where(live, new["index"], row["index"])
      return logits, new
    logits, cache = jax.vmap(one, spmd_axis_name=self.batch_axes)(cache, active, tokens, positions)
    keys = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(
        seeds, counts)
    return sample_rows(logits, temperature, top_k, top_p, keys), cache

  # ------------------------------------------------------------------ requests in

  def submit(self, request: Request) -> Request:
    if self.draining:
      raise Draining("the server is shutting down")
    if self.error is not None:
      raise RuntimeError(f"the engine stopped: {self.error}")
    generate_lib.check_prompt_lengths([len(request.prompt)], self.max_len)
    request.submitted = time.monotonic()
    try:
      self.waiting.put_nowait(request)
    except queue.Full:
      raise QueueFull(f"the queue is full ({self.waiting.maxsize} requests waiting)") from None
    self._wake.set()
    return request

  @property
  def running(self) -> int:
    return sum(r.request is not None for r in self.rows)

  @property
  def queued(self) -> int:
    return self.waiting.qsize()

  # ------------------------------------------------------------------ the loop

  def start(self) -> None:
    self._cache = self._empty_cache()
    self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
    self._thread.start()

  def warm_up(self) -> None:
    """Compiles the decode step and the prefill of every prompt bucket before the first request
    (the first request of each length would otherwise wait for a compile); for each adapter,
    its decode step and the smallest bucket."""
    for adapter in self.adapters:
      if adapter:
        done = threading.Event()
        self.submit(Request([self.session.tokenizer.bos_id], max_tokens=2, adapter=adapter,
                            on_event=lambda e, d=done: e[0] == "done" and d.set()))
        done.wait()
    width = generate_lib.MIN_PROMPT_BUCKET // 2
    while width < self.max_len - 1:
      width = generate_lib.bucket(width + 1)
      done = threading.Event()
      self.submit(Request([self.session.tokenizer.bos_id] * min(width, self.max_len - 2),
                          max_tokens=2, on_event=lambda e, d=done: e[0] == "done" and d.set()))
      done.wait()

  def drain(self, timeout: float) -> bool:
    """Stops taking requests; waits up to `timeout` s for the running and queued ones to finish,
    then cancels what is left. True when everything finished in time."""
    self.draining = True
    deadline = time.monotonic() + timeout
    while (self.running or self.queued) and time.monotonic() < deadline:
      time.sleep(0.05)
    finished = not (self.running or self.queued)
    self.stop()
    return finished

  def stop(self) -> None:
    self.stopped.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
    for slot in self.rows:
      if slot.request is not None:
        self._finish(slot, "cancelled")
    while not self.waiting.empty():
      self._emit(self.waiting.get_nowait(), ("done", "cancelled"))

  def _run(self) -> None:
    try:
      while not self.stopped.is_set():
        self._admit()
        if not self.running:
          self._wake.wait(timeout=0.1)
          self._wake.clear()
          continue
        self._step()
    except BaseException as e:  # pylint: disable=broad-except
      # Never leave a client waiting: every request still here ends with 'error'.
      self.error = e
      self.stopped.set()
      for slot in self.rows:
        if slot.request is not None:
          self._finish(slot, "error")
      while not self.waiting.empty():
        self._emit(self.waiting.get_nowait(), ("done", "error"))
      raise

  def _admit(self) -> None:
    for _ in range(self.prefill_per_step):
      free = next((i for i, s in enumerate(self.rows) if s.request is None), None)
      if free is None:
        return
      try:
        request = self.waiting.get_nowait()
      except queue.Empty:
        return
      if request.cancelled:
        self._emit(request, ("done", "cancelled"))
        continue
      self._prefill_into(free, request)

  def _prefill_into(self, index: int, request: Request) -> None:
    n = len(request.prompt)
    width = generate_lib.bucket(n)
    tokens = np.full((1, width), self.session.tokenizer.pad_id, np.int32)
    segments = np.zeros((1, width), np.int32)
    tokens[0, :n], segments[0, :n] = request.prompt, 1
    request.started = time.monotonic()
    with self._context():
      adapter, alpha = self.adapters[request.adapter]
      first, self._cache = self._prefill(
          self.base, adapter, jnp.float32(alpha), self._cache, jnp.int32(index), tokens, segments,
          jnp.float32(request.temperature), jnp.int32(request.top_k), jnp.float32(request.top_p),
          jnp.uint32(request.seed))
    self.prompt_tokens += n
    slot = self.rows[index]
    slot.request, slot.position = request, n
    self._accept(slot, int(first))

  def _step(self) -> None:
    active = [s for s in self.rows if s.request is not None]
    for slot in active:  # a client gone since the last step: free its slot now
      if slot.request.cancelled:
        self._finish(slot, "cancelled")
    by_adapter = {}
    for i, slot in enumerate(self.rows):
      if slot.request is not None:
        by_adapter.setdefault(slot.request.adapter, []).append(i)
    if not by_adapter:
      return
    self.occupancy_sum += sum(len(v) for v in by_adapter.values())
    self.steps += 1
    # One decode step per adapter in use (rows of other adapters compute but are not read).
    for adapter, indices in by_adapter.items():
      arrays = self._step_arrays(indices)
      with self._context():
        params, alpha = self.adapters[adapter]
        tokens, self._cache = self._decode(self.base, params, jnp.float32(alpha), self._cache,
                                           *arrays)
      tokens = np.asarray(jax.device_get(tokens))
      for i in indices:
        slot = self.rows[i]
        slot.position += 1
        self._accept(slot, int(tokens[i]))

  def _step_arrays(self, indices):
    s = self.slots
    active = np.zeros(s, bool)
    active[indices] = True
    tokens, positions = np.zeros(s, np.int32), np.zeros(s, np.int32)
    temperature, top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
    top_k, counts = np.zeros(s, np.int32), np.zeros(s, np.int32)
    seeds = np.zeros(s, np.uint32)
    for i in indices:
      slot, r = self.rows[i], self.rows[i].request
      tokens[i], positions[i] = slot.last_token, slot.position
      temperature[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
      counts[i], seeds[i] = r.generated, r.seed
    return active, tokens, positions, temperature, top_k, top_p, seeds, counts

  def _accept(self, slot: _Slot, token: int) -> None:
    """The token sampled for the slot's request: send it, or finish the request."""
    request = slot.request
    if request.cancelled:
      self._finish(slot, "cancelled")
      return
    request.generated += 1
    if token in request.stop_tokens:
      self._finish(slot, "stop")
      return
    self.tokens_generated += 1
    self._emit(request, ("token", token))
    # The token just sampled has position n + generated - 1: the context ends at max_len - 1.
    if (request.generated >= request.max_tokens
        or len(request.prompt) + request.generated >= self.max_len):
      self._finish(slot, "length")
      return
    slot.last_token = token

  def _finish(self, slot: _Slot, reason: str) -> None:
    request, slot.request = slot.request, None
    self.cancelled += reason == "cancelled"
    self._emit(request, ("done", reason))

  @staticmethod
  def _emit(request: Request, event) -> None:
    if request.on_event is not None:
      try:
        request.on_event(event)
      except RuntimeError:  # the receiver's event loop is closed (the server is stopping)
        pass


class _Context:
  """The mesh and the logical-axis rules every jitted call runs under."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._stack = []

  def __enter__(self):
    mesh_cm, rules_cm = jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)
    mesh_cm.__enter__()
    rules_cm.__enter__()
    self._stack.append((mesh_cm, rules_cm))
    return self

  def __exit__(self, *exc):
    mesh_cm, rules_cm = self._stack.pop()
    rules_cm.__exit__(*exc)
    mesh_cm.__exit__(*exc)
