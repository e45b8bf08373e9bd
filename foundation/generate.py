r"""Text generation: prefill + KV-cache decoding, jitted and sharded like training.

  python -m foundation.generate --workdir runs/tiny --prompt "def fibonacci(n):"
  python -m foundation.generate --workdir runs/tiny --interactive --temperature 0.8 --top_p 0.95
  python -m foundation.generate --workdir runs/vlm --image scene.png \
      --prompt "<image> question: what colour is the shape? answer:"

The workdir's config.json gives the model, the mesh and the tokenizer; the latest checkpoint gives
the params (params only: the optimizer state is never read), restored straight into their training
shardings. In Python:

  session = generate.load(workdir)
  texts = session.generate(["def f(x):", "import"], max_new_tokens=64)
  session.classify(["a great film"])   # a classifier's workdir: [('pos', {'pos': 0.93, 'neg': ..})]
  ids = generate.generate(model, params, [[1, 5, 6], [1, 7]], max_new_tokens=8, max_len=512,
                          sampling=generate.Sampling(temperature=0.7, top_k=50, top_p=0.9),
                          stop_tokens=(2,), mesh=mesh, axis_rules=rules)

How a batch of prompts of different lengths is decoded: the prompts are LEFT-padded to one length
(a bucket, so few lengths compile), so every row writes its next token into the same cache slot
and one decode step serves all rows. Padding slots have segment id 0 and are never attended to;
each row's rotary positions count from 0 at its own first token, so the results are those of the
prompt alone. A row stops at a stop token, at `max_new_tokens`, or when it fills the context.

A classifier's workdir (configs/finetune.py:task=classify) has labels, not text: `--prompt TEXT`
prints each text's label by name with its probability, then the `--top_k` most likely labels
(default: up to 5), e.g. `pos (p=0.93)  top 2: pos 0.930, neg 0.070`. The names are the run's
WORKDIR/labels.json (index = id).

An image-conditioned LM's workdir (configs/vlm.py, model.family='vlm') reads an image with its
prompt: `--image FILE` goes through the run's data.pp_eval, and the prefill writes its image
tokens into cache slots 0..P-1 before the (left-padded) prompt; a leading "<image>" placeholder in
the prompt is dropped (the image's place is always the start).
"""

import dataclasses
import functools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from foundation import lora
from foundation import mesh as mesh_lib
from foundation import workdir as workdir_lib
from foundation.models import transformer

# Prompt lengths are padded up to a power of two of at least this: few shapes, few compiles.
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked: temperature 0 is greedy (argmax); else softmax(logits / T)
  restricted to the `top_k` most likely tokens (0: all) and to the smallest set whose probability
  reaches `top_p` (1.0: all), in that order (as Hugging Face does)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"sampling: temperature={self.temperature} and top_k={self.top_k} must be "
                       f">= 0 and top_p={self.top_p} in (0, 1]")


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """float32 logits [B, V] -> int32 token ids [B]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below top_p: the most likely one always stays.
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "stop_tokens"))
def _generate(model, params, prompt, segments, budget, image, rng, max_new_tokens: int,
              sampling: Sampling, stop_tokens: tuple[int, ...]):
  """Prefill the left-padded prompt [B, P], then decode up to `max_new_tokens` per row.

  prompt, segments: int32 [B, P] (segment 1 on real tokens, 0 on padding); budget: int32 [B],
  the most new tokens each row may have. Returns int32 [B, max_new_tokens]: the new tokens, each
  row's stop token included, then -1 after the row has finished. image: None, or float
  [B, H, W, C] for an image-conditioned LM (the vlm family): its prefill puts the image tokens
  first (cfg.num_image_tokens cache slots).
  """
  batch, prompt_len = prompt.shape
  cfg = getattr(model.cfg, "decoder", model.cfg)  # the vlm family's decoder holds the cache
  prefix = 0 if image is None else model.cfg.num_image_tokens
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  cache = transformer.init_cache(cfg, batch, prefix + prompt_len + max_new_tokens)
  with_image = {} if image is None else {"image": image}
  logits, cache = model.apply({"params": params}, prompt, positions, segments, cache=cache,
                              **with_image)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, position, cache, out, done = carry
    out = out.at[:, i].set(jnp.where(done, -1, token))
    done = done | jnp.isin(token, stops) | (i + 1 >= budget)
    ones = jnp.ones((batch, 1), jnp.int32)
    logits, cache = model.apply({"params": params}, token[:, None], position[:, None], ones,
                                cache=cache)
    token = sample_logits(logits[:, -1], jax.random.fold_in(rng, i + 1), sampling)
    return i + 1, token, position + 1, cache, out, done

  first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), sampling)
  out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
  carry = (jnp.int32(0), first, positions[:, -1] + 1, cache, out, budget <= 0)
  return jax.lax.while_loop(cond, body, carry)[4]


def bucket(n: int) -> int:
  return max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length())


def check_prompt_lengths(lengths: Sequence[int], max_len: int) -> None:
  """A prompt that leaves no room for a new token within the context is an error, naming it."""
  for i, n in enumerate(lengths):
    if n >= max_len:
      raise ValueError(
          f"prompt {i} is {n} tokens long, but the model's context is {max_len} tokens "
          f"(model.max_seq_len): it leaves no room for a new token; shorten the prompt to at most "
          f"{max_len - 1} tokens")
    if n == 0:
      raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the BOS token)")


def place_batch(array: np.ndarray, mesh, axis_rules) -> jax.Array:
  """Puts a host array [B, ...] (the same on every host) on the mesh, batch split like training."""
  batch_axes = nn.logical_to_mesh_axes(("batch",), axis_rules)[0]
  sharding = jax.sharding.NamedSharding(mesh, jax.P(batch_axes))
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def generate(model: transformer.Transformer, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, max_len: int, sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), pad_id: int = 0, seed: int = 0, mesh=None,
             axis_rules=None, images: np.ndarray | None = None) -> list[list[int]]:
  """Continues each prompt (token ids); returns the new ids of each, stop token excluded.

  Args:
    model, params: the LM and its params (sharded or not; a mesh-sharded tree stays where it is).
    prompts: B lists of token ids, any lengths from 1 to max_len - 1 (longer: ValueError).
    max_new_tokens: at most this many new tokens per prompt; fewer where the context
      (`max_len` tokens, prompt included) runs out.
    sampling: greedy by default. seed: the sampling randomness.
    stop_tokens: ids that end a row (typically the tokenizer's EOS).
    mesh, axis_rules: when given, the prompts are laid out on the mesh like a training batch
      (the batch padded to a multiple of the data-parallel degree) and the call runs under the
      mesh and rules. Without them the call uses whatever context the caller set.
    images: an image-conditioned LM's (the vlm family's) images, float [B, H, W, C], one per
      prompt (`max_len` is then the text's room: the model's cfg.max_seq_len).
  """
  lengths = [len(p) for p in prompts]
  check_prompt_lengths(lengths, max_len)
  budget = np.array([max(0, min(max_new_tokens, max_len - n)) for n in lengths], np.int32)
  steps = int(budget.max())
  if steps == 0:
    return [[] for _ in prompts]
  dp = 1 if mesh is None else mesh_lib.data_parallel_degree(mesh, axis_rules)
  rows = -(-len(prompts) // dp) * dp  # the batch must split evenly over the data-parallel axes
  width = bucket(max(lengths))
  tokens = np.full((rows, width), pad_id, np.int32)
  segments = np.zeros((rows, width), np.int32)
  budget = np.concatenate([budget, np.zeros(rows - len(prompts), np.int32)])
  for i in range(rows):  # extra rows repeat the first prompt (budget 0: finished from the start)
    ids = prompts[i] if i < len(prompts) else prompts[0]
    tokens[i, width - len(ids):], segments[i, width - len(ids):] = ids, 1
  args = (tokens, segments, budget)
  if images is not None:  # extra rows repeat the first image, as they repeat the first prompt
    images = np.asarray(images, np.float32)
    images = np.concatenate([images, np.repeat(images[:1], rows - len(prompts), axis=0)])
    args += (images,)
  else:
    args += (None,)
  call = functools.partial(_generate, model, params, rng=jax.random.key(seed),
                           max_new_tokens=steps, sampling=sampling,
                           stop_tokens=tuple(int(t) for t in stop_tokens))
  if mesh is None:
    out = to_host(call(*args))
  else:
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      out = to_host(call(*(a if a is None else place_batch(a, mesh, axis_rules) for a in args)))
  results = []
  for row in out[:len(prompts)]:
    ids = [int(t) for t in row if t >= 0]
    if ids and ids[-1] in stop_tokens:
      ids = ids[:-1]
    results.append(ids)
  return results


def greedy_continuation(model, params, tokenizer, prompt: str, new_tokens: int,
                        max_len: int) -> str:
  """The text the model writes after `prompt` (greedy, at most `new_tokens` tokens, up to EOS).

  The prompt is cut from the left so that prompt and continuation fit `max_len` tokens. Runs in
  the caller's mesh/rules context (the trainer's).
  """
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  new_tokens = max(0, min(new_tokens, max_len - 1))
  ids = ids[-(max_len - new_tokens):]
  if new_tokens == 0:
    return ""
  out = generate(model, params, [ids], max_new_tokens=new_tokens, max_len=max_len,
                 stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  return tokenizer.decode(out[0])


# ------------------------------------------------------------------ a workdir, ready to generate

def load_config(workdir: str, overrides: Sequence[str] = ()):
  """DIR/config.json as a ConfigDict. The file describes the run whole (family, task and every
  field); groups an older run's file lacks take foundation/defaults.py's values, never an LM
  template. Paths of files kept in the workdir (its tokenizer copy) are resolved against DIR
  (workdir.resolve), so a moved or copied workdir loads.

  overrides: 'a.b=value' strings (value parsed as JSON when it can be, else a string).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from foundation import defaults  # pylint: disable=g-import-not-at-top
  saved = defaults.migrate(workdir_lib.read(workdir))
  config = defaults.completion()
  _merge(config, saved)
  return ml_collections.ConfigDict(
      workdir_lib.resolve(apply_overrides(config, overrides), workdir))


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
  """Sets 'a.b=value' fields of a plain config dict (value parsed as JSON when it can be)."""
  for override in overrides:
    key, _, value = override.partition("=")
    node = config
    *parents, leaf = key.strip().split(".")
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
      raise ValueError(f"override {override!r}: '{key}' is not a config field")
    try:
      node[leaf] = json.loads(value)
    except json.JSONDecodeError:
      node[leaf] = value
  return config


def _merge(base: dict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = value


def abstract_params(model, config, mesh):
  """The params' ShapeDtypeStructs with their training shardings (as foundation.train lays them)."""
  from foundation import optim  # pylint: disable=g-import-not-at-top
  from foundation import step as step_lib  # pylint: disable=g-import-not-at-top
  abstract, _ = step_lib.state_shardings(model, optim.make_optimizer(config), config, mesh)
  return abstract["params"]


def restore_params(workdir: str, target, step: int | None = None):
  """Restores only the params of checkpoint `step` (default: the latest) into `target`'s shardings.

  target: tree of jax.ShapeDtypeStruct with shardings. Returns (params, step). Orbax partial
  restore: the optimizer state on disk is never read.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                           "checkpoints")
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  item = {"params": target}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  manager.close()
  return restored["state"]["params"], step


@dataclasses.dataclass
class Session:
  """A model restored from a workdir, with its tokenizer and mesh: ready to generate or score."""
  config: object
  model: transformer.Transformer
  params: object
  tokenizer: object
  mesh: object
  step: int
  labels: list[str] | None = None  # a classifier's label names, index = id (WORKDIR/labels.json)

  @property
  def axis_rules(self):
    return mesh_lib.rules(self.config)

  @property
  def is_classifier(self) -> bool:
    return self.config.model.get("num_classes", 0) > 0

  @property
  def max_len(self) -> int:
    return self.model.cfg.max_seq_len

  def generate_ids(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """`generate` on this session's model, mesh and rules; EOS stops a row unless told otherwise."""
    if self.is_classifier:
      raise ValueError(f"this workdir is a classifier (model.num_classes="
                       f"{self.config.model.num_classes}): it predicts labels, not text; use "
                       f"session.classify(texts) (or generate --prompt, which prints the label)")
    kwargs.setdefault("stop_tokens", (self.tokenizer.eos_id,))
    kwargs.setdefault("pad_id", self.tokenizer.pad_id)
    kwargs.setdefault("max_len", self.max_len)
    return generate(self.model, self.params, prompts, mesh=self.mesh,
                    axis_rules=self.axis_rules, **kwargs)

  def encode_prompt(self, text: str) -> list[int]:
    return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

  def generate(self, texts: Sequence[str], **kwargs) -> list[str]:
    """Continuations of each text (BOS + text), decoded; kwargs as `generate`."""
    out = self.generate_ids([self.encode_prompt(t) for t in texts], **kwargs)
    return [self.tokenizer.decode(ids) for ids in out]

  def classify(self, texts: Sequence[str],
               batch_size: int = 32) -> list[tuple[str, dict[str, float]]]:
    """A classifier's prediction for each text: (label name, {name: probability}), the dict
    ordered from the most likely label. Each text is the row training made of it
    ([bos] + text + [eos], cut to seq_len as classify.truncate says); the head reads the eos."""
    if not self.is_classifier:
      raise ValueError("this workdir is a language model (model.num_classes=0): it has no labels; "
                       "use session.generate(texts)")
    from foundation.data import classify  # pylint: disable=g-import-not-at-top
    seq_len, truncate = self.config.seq_len, self.config.classify.truncate
    tokens = [classify.encode(self.tokenizer, text, seq_len, truncate) for text in texts]
    dp = mesh_lib.data_parallel_degree(self.mesh, self.axis_rules)
    out = []
    for start in range(0, len(tokens), batch_size):
      chunk = tokens[start:start + batch_size]
      n = -(-len(chunk) // dp) * dp  # rows past the texts repeat the first one (ignored)
      rows = [(i,) for i in range(len(chunk))] + [(0,)] * (n - len(chunk))
      width = min(seq_len, bucket(max(len(t) for t in chunk)))
      batch = classify.build_batch(chunk, np.zeros(len(chunk), np.int32), rows, width)
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.axis_rules):
        placed = {k: place_batch(v, self.mesh, self.axis_rules) for k, v in batch.items()}
        logits = to_host(_classify_logits(self.model, self.params, placed))[:len(chunk)]
      logits = logits.astype(np.float64)
      probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
      probs /= probs.sum(axis=-1, keepdims=True)
      for row in probs:
        order = np.argsort(-row, kind="stable")
        out.append((self.labels[order[0]],
                    {self.labels[i]: float(row[i]) for i in order}))
    return out


@functools.partial(jax.jit, static_argnames=("model",))
def _classify_logits(model, params, batch):
  from foundation import finetune  # pylint: disable=g-import-not-at-top
  return finetune.classify_logits(model, params, batch)


def label_names(workdir: str, config) -> list[str]:
  """A classifier's label names (index = id): WORKDIR/labels.json; a run from before that file
  was kept falls back on classify.labels, else the ids themselves ('0', '1', ...), and says so."""
  from foundation.data import classify  # pylint: disable=g-import-not-at-top
  classes = config.model.num_classes
  names = classify.read_labels(workdir)
  where = os.path.join(workdir, classify.LABELS_FILE)
  if names is None:
    given = config.get("classify", {}).get("labels", "")
    names = [n.strip() for n in given.split(",")] if given else [str(i) for i in range(classes)]
    print(f"{where} does not exist (a run from before it was kept): labels are "
          f"{'classify.labels' if given else 'shown as their ids'}", file=sys.stderr)
  if len(names) != classes:
    raise ValueError(f"{where}: {len(names)} labels {names[:20]}, but model.num_classes={classes}")
  return names


def load(workdir: str, step: int | None = None, overrides: Sequence[str] = ()) -> Session:
  """The model of `workdir` (config.json + a checkpoint's params), sharded on this host's devices."""
  mesh_lib.initialize_distributed()
  config = load_config(workdir, overrides)
  from foundation import build as build_lib  # pylint: disable=g-import-not-at-top
  built = build_lib.build(config)
  model, mesh = built.model, built.mesh
  params, step = restore_params(workdir, built.abstract_state["params"], step)
  params = lora.model_params(params, config)  # a LoRA run's adapters folded into the kernels
  # None for a task without text (images). No vocabulary check: an imported model may be driven
  # by a caller's own tokenizer (Session.tokenizer).
  tokenizer = built.task.tokenizer(check_vocab=False)
  labels = label_names(workdir, config) if config.get("task") == "classify" else None
  return Session(config, model, params, tokenizer, mesh, step, labels)


# ------------------------------------------------------------------ chat

class ChatTemplate:
  """How a conversation becomes the prompt a model continues: the one format the model was
  trained with, shared by `--interactive` and the server's /v1/chat/completions.

  kind 'sft': the workdir was fine-tuned with task=sft: foundation/data/sft.py's template
    (<|system|>/<|user|>/<|assistant|> headers, the answer ends at eos).
  kind 'hf': an imported model whose tokenizer_config.json has a `chat_template` (Jinja, rendered
    in a sandbox as transformers does, with add_generation_prompt=True).
  kind 'plain': a base model, which has no chat format of its own: a "User: ... / Assistant: ..."
    transcript, the reply cut where the model starts the next "User:" line.

  messages: [{'role': 'system' | 'user' | 'assistant', 'content': str}], ending with a user turn.
  """
  USER, ASSISTANT = "User:", "Assistant:"

  def __init__(self, kind: str, tokenizer, jinja_source: str = ""):
    self.kind, self.tokenizer, self.jinja_source = kind, tokenizer, jinja_source
    self._jinja = None
    if kind == "hf":
      from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
      env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = _raise_template_error
      self._jinja = env.from_string(jinja_source)

  @classmethod
  def of(cls, config, tokenizer) -> "ChatTemplate":
    if config.get("task") == "sft":
      return cls("sft", tokenizer)
    sidecar = getattr(tokenizer, "sidecar_bytes", None)
    if sidecar:
      source = json.loads(sidecar).get("chat_template")
      if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
      if isinstance(source, str) and source:
        return cls("hf", tokenizer, source)
    return cls("plain", tokenizer)

  @property
  def stop_texts(self) -> tuple[str, ...]:
    """Texts that end the reply besides the EOS token."""
    return (f"\n{self.USER}",) if self.kind == "plain" else ()

  def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
    tok = self.tokenizer
    if self.kind == "sft":
      from foundation.data import sft  # pylint: disable=g-import-not-at-top
      return sft.chat_prompt_ids(tok, list(messages))
    if self.kind == "hf":
      special = {}
      for kind in ("bos", "eos"):
        token_id = getattr(tok, f"{kind}_id")
        special[f"{kind}_token"] = tok._tok.id_to_token(token_id) if hasattr(tok, "_tok") else ""
      text = self._jinja.render(messages=list(messages), add_generation_prompt=True, **special)
      return tok.encode(text)
    return [tok.bos_id] + tok.encode(self.transcript(messages))

  def transcript(self, messages: Sequence[dict]) -> str:
    """The plain format's text (a system message is a first line of its own)."""
    lines = []
    for m in messages:
      if m["role"] == "system":
        lines.append(m["content"])
      else:
        lines.append(f"{self.USER if m['role'] == 'user' else self.ASSISTANT} {m['content']}")
    return "\n".join(lines + [self.ASSISTANT])

  def clean_reply(self, text: str) -> str:
    """The reply as the conversation keeps it: cut at a stop text, stripped."""
    for stop in self.stop_texts:
      text = text.split(stop)[0]
    return text.strip()


def _raise_template_error(message):
  raise ValueError(f"the chat template refused the messages: {message}")


class Chat:
  """A conversation with the model in its own chat format (`ChatTemplate`). The oldest turns are
  dropped when the prompt would not leave `reply_tokens` of context."""
  USER, ASSISTANT = ChatTemplate.USER, ChatTemplate.ASSISTANT

  def __init__(self, session: Session, reply_tokens: int = 128, system: str = "", **kwargs):
    self.session, self.reply_tokens, self.system = session, reply_tokens, system
    self.template = ChatTemplate.of(session.config, session.tokenizer)
    self.kwargs = kwargs  # sampling, seed, ...
    self.history: list[tuple[str, str]] = []
    self.last_prompt: list[int] = []  # the token ids of the last turn's prompt

  def messages(self, message: str, turns: Sequence[tuple[str, str]]) -> list[dict]:
    out = [{"role": "system", "content": self.system}] if self.system else []
    for user, assistant in turns:
      out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out + [{"role": "user", "content": message}]

  def transcript(self, message: str, turns: Sequence[tuple[str, str]]) -> str:
    """The plain format's text of a turn (what a base model continues)."""
    return self.template.transcript(self.messages(message, turns))

  def send(self, message: str) -> str:
    """The assistant's reply to `message`; both join the history."""
    session, room = self.session, self.session.max_len - self.reply_tokens
    turns = list(self.history)
    ids = self.template.prompt_ids(self.messages(message, turns))
    while len(ids) > room and turns:
      turns.pop(0)
      ids = self.template.prompt_ids(self.messages(message, turns))
    self.last_prompt = ids
    new = session.generate_ids([ids], max_new_tokens=self.reply_tokens, **self.kwargs)[0]
    reply = self.template.clean_reply(session.tokenizer.decode(new))
    self.history.append((message, reply))
    return reply


# ------------------------------------------------------------------ command line

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "A run's workdir: config.json and checkpoints/.")
  flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
  flags.DEFINE_bool("interactive", False, "Chat: read messages from stdin, keep the history.")
  flags.DEFINE_integer("max_new_tokens", 128, "At most this many new tokens per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample from softmax(logits / T).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all); a "
                       "classifier: show the k most likely labels (0: up to 5).")
  flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this much probability.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("system", "", "Interactive: a first line of the transcript.")
  flags.DEFINE_multi_string("override", [], "A config field of the workdir, e.g. mesh.tensor=2.")
  flags.DEFINE_string("image", None, "An image-conditioned LM (model.family='vlm'): the image "
                      "file (PNG, JPEG) every --prompt is about.")


def _interactive(chat: Chat) -> None:
  print(f"Chat ({chat.template.kind} template): an empty line or Ctrl-D ends it; /reset forgets "
        f"the history.")
  while True:
    try:
      message = input("you> ").strip()
    except EOFError:
      break
    if not message:
      break
    if message == "/reset":
      chat.history.clear()
      continue
    try:
      print(f"model> {chat.send(message)}", flush=True)
    except ValueError as e:  # a message too long for the context: say so, keep chatting
      print(f"error: {e}", flush=True)


def format_label(label: str, probs: dict[str, float], top_k: int) -> str:
  """'pos (p=0.93)  top 2: pos 0.930, neg 0.070'."""
  top = list(probs.items())[:top_k]
  return (f"{label} (p={probs[label]:.2f})  top {len(top)}: "
          + ", ".join(f"{name} {p:.3f}" for name, p in top))


def _print_labels(texts: Sequence[str], results, top_k: int) -> None:
  for text, (label, probs) in zip(texts, results):
    if len(texts) > 1:
      print(text)
    print(format_label(label, probs, top_k))
    if len(texts) > 1:
      print("---")


IMAGE_PLACEHOLDER = "<image>"


def _without_placeholder(prompt: str) -> str:
  """A vlm prompt template's text after its leading image placeholder (the image comes first)."""
  stripped = prompt.lstrip()
  if stripped.startswith(IMAGE_PLACEHOLDER):
    return stripped[len(IMAGE_PLACEHOLDER):].strip()
  return prompt


def _image_arguments(session: Session, image: str | None, prompts, interactive: bool) -> dict:
  """{'images': [B, H, W, C]} for an image-conditioned LM's workdir and --image; {} for an LM."""
  reads_images = hasattr(session.model.cfg, "num_image_tokens")
  if not reads_images:
    if image:
      raise ValueError(f"--image={image!r}: this workdir's model (model.family="
                       f"{session.config.model.get('family', 'decoder')!r}) reads no images")
    return {}
  if not image:
    raise ValueError("this workdir's model (model.family='vlm') reads an image with its prompt: "
                     "give --image FILE")
  if interactive:
    raise ValueError("--interactive with --image: give the questions with --prompt")
  from foundation.data import image_input  # pylint: disable=g-import-not-at-top
  pixels = image_input.image_from_file(session.config, image)
  return {"images": np.repeat(pixels[None], len(prompts), axis=0)}


def main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a restore at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.workdir or not (f.prompt or f.interactive):
    raise app.UsageError("--workdir and one of --prompt or --interactive are required")
  try:
    sampling = Sampling(f.temperature, f.top_k, f.top_p)
    session = load(f.workdir, f.step, f.override)
    print(f"{f.workdir}: step {session.step}, {session.model.cfg.n_layers} layers, "
          f"{mesh_lib.describe(session.mesh, session.config.mesh)}", file=sys.stderr)
    if session.is_classifier:
      if f.interactive or not f.prompt:
        raise ValueError("--interactive: this workdir is a classifier; give the texts to label "
                         "with --prompt TEXT (repeat the flag for several)")
      _print_labels(f.prompt, session.classify(f.prompt), f.top_k or 5)
      return
    extra = _image_arguments(session, f.image, f.prompt, f.interactive)
    if f.interactive:
      _interactive(Chat(session, f.max_new_tokens, f.system, sampling=sampling, seed=f.seed))
      return
    texts = session.generate([_without_placeholder(p) for p in f.prompt],
                             max_new_tokens=f.max_new_tokens, sampling=sampling, seed=f.seed,
                             **extra)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  for prompt, text in zip(f.prompt, texts):
    print(f"{prompt}{text}")
    if len(f.prompt) > 1:
      print("---")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
