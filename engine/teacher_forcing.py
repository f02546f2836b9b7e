"""Teacher forcing: next-token log-probabilities of given continuations after a KV state, used to
compare a compressed run's distributions with the uncompressed run's on the same tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from engine.generation import pad_prompts
from models.kv_cache import KVState
from models import llama


def copy_state(kv_state: KVState) -> KVState:
    """A copy to feed to `continuation_log_probs`, which consumes (donates) the state it reads."""
    return jax.tree.map(jnp.copy, kv_state)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("kv_state",))
def _forced_logits(params, config, tokens, valid, kv_state: KVState):
    """Logits at every position of `tokens` fed after the KV state."""
    hidden, _ = llama.forward(params, config, tokens, valid, kv_state)
    return llama.logits(params, hidden)


def continuation_log_probs(params, config, kv_state: KVState, questions, continuations):
    """log-probabilities [b, k, vocab] of each continuation token (k per row) given the question
    and the continuation before it, all fed after `kv_state` in one forward pass."""
    sequences = [q + c[:-1] for q, c in zip(questions, continuations)]
    tokens = pad_prompts(sequences)
    valid = np.arange(tokens.shape[1])[None] < np.array([len(s) for s in sequences])[:, None]
    logits = _forced_logits(params, config, jnp.asarray(tokens), jnp.asarray(valid), kv_state)
    k = len(continuations[0])
    index = np.array([len(q) - 1 + np.arange(k) for q in questions])
    return jax.nn.log_softmax(np.take_along_axis(np.asarray(logits), index[..., None], 1), -1)
