"""Text generation. For now: a greedy continuation that recomputes the whole sequence each step.

It is what the trainer prints at the end of a run. Prefill + KV-cache decoding, sampling and the
`python -m foundation.generate` command build on this later.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "new_tokens"))
def _greedy(model, params, buffer, prompt_len: int, new_tokens: int):
  """Fills buffer[:, prompt_len:prompt_len + new_tokens] greedily; buffer: int32 [1, T]."""
  positions = jnp.arange(buffer.shape[1], dtype=jnp.int32)[None]
  # Causal attention already hides the not-yet-written tail, so every slot is one segment.
  segment_ids = jnp.ones_like(buffer)

  def write_next(i, buffer):
    logits = model.apply({"params": params}, buffer, positions, segment_ids)
    next_token = jnp.argmax(logits[0, i - 1], axis=-1).astype(buffer.dtype)
    return buffer.at[0, i].set(next_token)

  return jax.lax.fori_loop(prompt_len, prompt_len + new_tokens, write_next, buffer)


def greedy_continuation(model, params, tokenizer, prompt: str, new_tokens: int,
                        max_len: int) -> str:
  """The text the model writes after `prompt` (greedy, at most `new_tokens` tokens).

  The prompt is cut from the left so that prompt and continuation fit `max_len` tokens.
  """
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  new_tokens = max(0, min(new_tokens, max_len - 1))
  ids = ids[-(max_len - new_tokens):]
  buffer = np.zeros((1, len(ids) + new_tokens), np.int32)
  buffer[0, :len(ids)] = ids
  out = np.asarray(_greedy(model, params, jnp.asarray(buffer), len(ids), new_tokens))
  generated = [int(t) for t in out[0, len(ids):]]
  if tokenizer.eos_id in generated:
    generated = generated[:generated.index(tokenizer.eos_id)]
  return tokenizer.decode(generated)
