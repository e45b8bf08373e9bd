r"""Supervised fine-tuning (SFT) data: chat records -> packed rows, loss on assistant tokens only.

Input: JSONL files (`sft.train_path`, a glob), one record a line, either
  {"prompt": "...", "response": "..."[, "system": "..."]}      or
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
with at least one assistant message.

The chat template (plain text, so any tokenizer -- bytes or SentencePiece -- encodes it):

  <bos><|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}<eos><|user|>\n...

Each turn is encoded on its own: the role header and every non-assistant turn are context (no
loss); an assistant turn's content and the eos after it are trained. `chat_prompt_ids` builds the
same ids for generation, ending with the assistant header, so a fine-tuned model answers and
stops at eos.

Rows: each epoch the train examples are shuffled (seeded) and packed next-fit into rows of
seq_len tokens; segment ids keep attention inside an example, positions restart at 0 for each,
the rest of a row is padding (segment 0, loss_mask 0). Batches follow the pre-training contract:
int32 [host_batch, seq_len] inputs, targets, segment_ids, positions, loss_mask.

Too long: a prompt (everything before the first answer token) that leaves no room for a single
answer token in seq_len is always an error naming the record. A longer answer is cut at seq_len
(sft.overlong='truncate', the count is printed once) or is an error (sft.overlong='error').

Eval: `sft.eval_path` when set, else the records whose hash falls under `sft.eval_fraction`.
"""

import dataclasses
import random

import numpy as np

from foundation.data import examples as examples_lib
from foundation.data import packing
from foundation.data import tokenizers

ROLES = ("system", "user", "assistant")
OVERLONG = ("truncate", "error")
_STREAM = 7  # the Feistel key stream of the SFT shuffle (independent of pre-training's)


def header(role: str) -> str:
  return f"<|{role}|>\n"


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized record: ids [n] (bos, template, turns, eos after each answer) and `trained`
  [n], True on the tokens whose prediction is trained (assistant contents and their eos)."""
  ids: np.ndarray
  trained: np.ndarray
  where: str

  @property
  def prompt_length(self) -> int:
    """Tokens before the first trained one."""
    return int(np.argmax(self.trained))


# ---------------------------------------------------------------- records -> messages

def messages_of(record, where: str) -> list[dict]:
  """A record as [{'role', 'content'}]; clear errors (naming `where`) for anything else."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                       f"{{'role', 'content'}} objects")
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
        raise ValueError(f"{where}: message {i} must be {{'role': ..., 'content': '...'}} with "
                         f"string content, got {json_snippet(m)}")
      if m["role"] not in ROLES:
        raise ValueError(f"{where}: message {i} has role {m['role']!r}; roles are "
                         f"{', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
      raise ValueError(f"{where}: no assistant message (roles {[m['role'] for m in messages]}): "
                       f"nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
  if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
    system = record.get("system")
    if system is not None and not isinstance(system, str):
      raise ValueError(f"{where}: 'system' must be a string, got {json_snippet(system)}")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": record["prompt"]},
                   {"role": "assistant", "content": record["response"]}]
  raise ValueError(f"{where}: a record needs string fields 'prompt' and 'response', or "
                   f"'messages' (a list of {{'role', 'content'}}); it has keys {sorted(record)}")


def json_snippet(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- the template

def encode_chat(tokenizer, messages: list[dict], where: str = "") -> Example:
  """Messages -> Example: bos, each turn (header + content), eos after each assistant turn."""
  ids, trained = [tokenizer.bos_id], [False]
  for m in messages:
    context = tokenizer.encode(header(m["role"]))
    if m["role"] == "assistant":
      answer = tokenizer.encode(m["content"]) + [tokenizer.eos_id]
      ids += context + answer
      trained += [False] * len(context) + [True] * len(answer)
    else:
      context += tokenizer.encode(m["content"] + "\n")
      ids += context
      trained += [False] * len(context)
  return Example(np.asarray(ids, np.int32), np.asarray(trained, bool), where)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
  """The ids a fine-tuned model continues to answer `messages` (which end with a user turn):
  the training template of the conversation so far, then the assistant header."""
  example = encode_chat(tokenizer, messages + [{"role": "assistant", "content": ""}])
  return example.ids[:-1].tolist()  # drop the eos of the empty answer


def fit(example: Example, seq_len: int, overlong: str) -> Example | None:
  """The example cut to seq_len + 1 ids (seq_len input/target pairs), or the error.

  Returns None when it already fits. A prompt that leaves no answer token inside the context is
  always an error; a long answer is cut ('truncate') or an error ('error')."""
  if len(example.ids) - 1 <= seq_len:
    return None
  prompt = example.prompt_length
  if prompt > seq_len:
    raise ValueError(
        f"{example.where}: the prompt is {prompt} tokens (bos, chat template and every turn "
        f"before the first answer) but seq_len={seq_len}: no answer token fits in the context. "
        f"Shorten or drop the record, or raise --config.seq_len")
  if overlong == "error":
    raise ValueError(
        f"{example.where}: the example is {len(example.ids) - 1} tokens, longer than "
        f"seq_len={seq_len} (sft.overlong='error'; 'truncate' cuts the answer instead)")
  keep = seq_len + 1
  return Example(example.ids[:keep], example.trained[:keep], example.where)


def tokenize(records: list, tokenizer, seq_len: int, overlong: str) -> tuple[list[Example], int]:
  """Records -> (examples fitted to seq_len, how many were cut)."""
  if overlong not in OVERLONG:
    raise ValueError(f"sft.overlong={overlong!r} is not one of {OVERLONG}")
  out, cut = [], 0
  for record in records:
    example = encode_chat(tokenizer, messages_of(record.value, record.where), record.where)
    shorter = fit(example, seq_len, overlong)
    cut += shorter is not None
    out.append(shorter or example)
  return out, cut


# ---------------------------------------------------------------- rows -> batches

def build_batch(examples: list[Example], rows: examples_lib.Rows, seq_len: int) -> dict:
  """Rows (tuples of example indices; () is an empty row) -> the model batch, int32 [rows, L]:
  inputs, targets, segment_ids, positions, loss_mask (1 on assistant targets only)."""
  n = len(rows)
  inputs = np.zeros((n, seq_len), np.int32)
  targets = np.zeros((n, seq_len), np.int32)
  starts = np.zeros((n, seq_len), bool)
  real = np.zeros((n, seq_len), bool)
  trained = np.zeros((n, seq_len), bool)
  for r, row in enumerate(rows):
    col = 0
    for i in row:
      e = examples[i]
      k = len(e.ids) - 1
      inputs[r, col:col + k], targets[r, col:col + k] = e.ids[:-1], e.ids[1:]
      trained[r, col:col + k] = e.trained[1:]  # the loss of predicting token t+1
      starts[r, col], real[r, col:col + k] = True, True
      col += k
  batch = packing.finish_rows(inputs, targets, starts, real)
  batch["loss_mask"] = trained.astype(np.int32)
  return batch


def _lengths(examples: list[Example]) -> np.ndarray:
  return np.asarray([len(e.ids) - 1 for e in examples], np.int64)


def pack_in_order(examples: list[Example], seq_len: int) -> examples_lib.Rows:
  """Every example in its own order, packed next-fit (eval rows)."""
  return examples_lib.next_fit(_lengths(examples), np.arange(len(examples)), seq_len)


# ---------------------------------------------------------------- reading a config

def _tokenizer(config):
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  tokenizers.check_vocab_size(tokenizer, config)
  return tokenizer


def read_split(config, split: str) -> tuple[list, list[str]]:
  """(records, files) of split 'train' or 'eval' (sft.eval_path, or the hash-held-out share)."""
  s = config.sft
  if not s.train_path:
    raise ValueError("sft.train_path is empty: give a JSONL file or glob of chat records, e.g. "
                     "--config.sft.train_path=data/chat.jsonl")
  if split == "eval" and s.eval_path:
    paths = examples_lib.glob_paths(s.eval_path, "sft.eval_path")
    return examples_lib.read_jsonl(paths), paths
  paths = examples_lib.glob_paths(s.train_path, "sft.train_path")
  records = examples_lib.read_jsonl(paths)
  if not records:
    raise ValueError(f"sft.train_path={s.train_path!r}: the files hold no records")
  fraction = 0.0 if s.eval_path else s.eval_fraction
  train, held_out = examples_lib.hash_split(records, fraction, f"sft.train_path={s.train_path!r}")
  return (train if split == "train" else held_out), paths


def _description(config, tokenizer, process_count: int, sha: str) -> dict:
  from foundation.data import pipeline  # pylint: disable=g-import-not-at-top
  description = pipeline.describe(config, tokenizer, [], process_count, "sft")
  description["sources"] = [[f"sft:{config.sft.train_path}", 1.0]]
  description["data_sha256"] = sha
  return description


def make_sft_iterator(config, process_index: int,
                      process_count: int) -> examples_lib.EpochIterator:
  """This host's endless SFT batches (int32 [batch_size // process_count, seq_len] inputs,
  targets, segment_ids, positions, loss_mask), with save/restore; the position is global, so it
  resumes on any host count."""
  tokenizer = _tokenizer(config)
  records, paths = read_split(config, "train")
  examples, cut = tokenize(records, tokenizer, config.seq_len, config.sft.overlong)
  if not any((e.ids[e.trained] != tokenizer.eos_id).any() for e in examples):
    raise ValueError(f"sft.train_path={config.sft.train_path!r}: no text to train on: the "
                     f"assistant answers of all {len(examples)} train records are empty")
  if cut and process_index == 0:
    print(f"sft: {cut} of {len(examples)} train examples are longer than seq_len="
          f"{config.seq_len}; their answers are cut (sft.overlong='truncate')")
  lengths = _lengths(examples)

  def plan(epoch: int) -> examples_lib.Rows:
    order = examples_lib.shuffled(len(examples), config.seed, _STREAM, epoch)
    return examples_lib.next_fit(lengths, order, config.seq_len)

  sha = examples_lib.data_sha256(paths)
  identity = {"data_sha256": sha, "examples": len(examples), "seed": config.seed,
              "seq_len": config.seq_len,
              "tokenizer_sha256": tokenizers.fingerprint(tokenizer)["sha256"]}
  return examples_lib.EpochIterator(
      plan, lambda rows: build_batch(examples, rows, config.seq_len), config.batch_size,
      process_index, process_count, identity, _description(config, tokenizer, process_count, sha))


def make_sft_eval_batches(config, process_index: int,
                          process_count: int) -> list[dict[str, np.ndarray]]:
  """This host's share of at most eval.steps SFT eval batches, in file order, the last padded with
  empty rows; the same number on every host and the same rows for any host count."""
  tokenizer = _tokenizer(config)
  records, _ = read_split(config, "eval")
  if not records:
    raise ValueError(f"sft: no eval records (sft.eval_path={config.sft.eval_path!r}, "
                     f"sft.eval_fraction={config.sft.eval_fraction}); give an eval file or set "
                     f"eval.every=0")
  examples, _ = tokenize(records, tokenizer, config.seq_len, config.sft.overlong)
  rows = pack_in_order(examples, config.seq_len)
  return examples_lib.eval_batches(
      rows, lambda r: build_batch(examples, r, config.seq_len), config, process_index,
      process_count)


# ---------------------------------------------------------------- a demo task

_OPERATIONS = (  # (what the function returns, its body), over arguments a, b
    ("the sum of {a} and {b}", "{a} + {b}"),
    ("{a} minus {b}", "{a} - {b}"),
    ("the product of {a} and {b}", "{a} * {b}"),
    ("the larger of {a} and {b}", "max({a}, {b})"),
    ("the smaller of {a} and {b}", "min({a}, {b})"),
    ("True when {a} equals {b}", "{a} == {b}"),
    ("{a} repeated {b} times", "{a} * {b}"),
    ("the remainder of {a} divided by {b}", "{a} % {b}"),
    ("{a} squared", "{a} ** 2"),
    ("the length of {a}", "len({a})"),
    ("{a} reversed", "{a}[::-1]"),
    ("True when {a} is even", "{a} % 2 == 0"),
    ("the absolute value of {a}", "abs({a})"),
    ("{a} in upper case", "{a}.upper()"),
    ("{a} in lower case", "{a}.lower()"),
    ("the words of {a}", "{a}.split()"),
    ("the items of {a} in sorted order", "sorted({a})"),
    ("the first item of {a}", "{a}[0]"),
    ("the last item of {a}", "{a}[-1]"),
    ("the sum of the items of {a}", "sum({a})"),
    ("the keys of the dictionary {a}", "list({a}.keys())"),
    ("{a} without leading and trailing whitespace", "{a}.strip()"),
)
_VERBS = ("get", "compute", "make", "find", "calc", "build", "check", "take")
_NOUNS = ("value", "total", "result", "count", "item", "record", "entry", "score", "size", "key",
          "name", "line", "token", "node", "path", "word")
_ARGS = ("x", "y", "n", "m", "a", "b", "value", "other", "items", "text", "data", "left", "right",
         "first", "second")


def python_function_records(count: int, seed: int = 0) -> list[dict]:
  """`count` prompt/response records of a small, learnable task in the pre-training corpus's
  domain (Python source): the prompt asks for a function by name, arguments and what it returns;
  the response is the function -- a def, a docstring and one return line. Deterministic in seed.
  """
  rng = random.Random(seed)
  records = []
  for _ in range(count):
    what, body = rng.choice(_OPERATIONS)
    a, b = rng.sample(_ARGS, 2)
    args = f"{a}, {b}" if "{b}" in what else a
    name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
    what, body = what.format(a=a, b=b), body.format(a=a, b=b)
    records.append({
        "prompt": f"Write a function {name}({args}) that returns {what}.",
        "response": f'def {name}({args}):\n    """Return {what}."""\n    return {body}\n'})
  return records
