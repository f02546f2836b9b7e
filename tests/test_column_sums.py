"""Column sums of a causal prefill's attention (H2O's scores): the plain-JAX reference against a
float64 NumPy softmax, the Pallas kernel against the reference (interpret mode on a CPU, the
compiled Triton kernel on a GPU), and the log-sum-exp the fused prefill attention hands over."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from models.attention import causal_self_attention
from pallas_kernels.errors import UserError
from pallas_kernels.column_sums import attention_column_sums
from pallas_kernels.column_sums_reference import attention_column_sums_reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, t, hq, d))
    k = r.normal(size=(b, t, hkv, d))
    k[..., :2] *= 4.0  # outlier channels: peaked rows, far from uniform
    v = r.normal(size=(b, t, hkv, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _numpy_softmax(q, k, lengths, window):
    """Yields (row, query head, float64 scores [n, n] with -inf where unseen) of valid rows."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    group = q.shape[2] // k.shape[2]
    for row, n in enumerate(np.asarray(lengths)):
        if n == 0:
            continue
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        seen = (j <= i) & ((i - j < window) if window else True)
        for h in range(q.shape[2]):
            yield row, h, np.where(seen, q[row, :n, h] @ k[row, :n, h // group].T
                                   / np.sqrt(q.shape[3]), -np.inf)


def _numpy_lse(q, k, lengths, window):
    lse = np.zeros(q.shape[:3])
    for row, h, s in _numpy_softmax(q, k, lengths, window):
        top = s.max(axis=1)
        lse[row, :len(s), h] = top + np.log(np.exp(s - top[:, None]).sum(axis=1))
    return lse


def _numpy_column_sums(q, k, lengths, window):
    """Full float64 softmax of every valid query head, summed down the columns per kv-head."""
    group = q.shape[2] // k.shape[2]
    out = np.zeros((q.shape[0], k.shape[2], q.shape[1]))
    for row, h, s in _numpy_softmax(q, k, lengths, window):
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[row, h // group, :len(s)] += (p / p.sum(axis=1, keepdims=True)).sum(axis=0)
    return out


def _lse(q, k, v, lengths, window):
    return causal_self_attention(q, k, v, jnp.asarray(lengths, jnp.int32), window)[1]


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 37])
def test_reference_matches_float64_softmax(hq, hkv, window):
    lengths = [150, 61, 0]
    q, k, _ = _inputs(0, 3, 150, hq, hkv, 16)
    lse = jnp.asarray(_numpy_lse(q, k, lengths, window), jnp.float32)
    got = attention_column_sums_reference(q, k, lse, jnp.asarray(lengths), window=window,
                                          chunk=64)
    np.testing.assert_allclose(got, _numpy_column_sums(q, k, lengths, window), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("window", [None, 29])
def test_prefill_attention_lse_is_the_log_sum_exp_of_scaled_scores(window):
    # On a GPU the 16-bit prefill goes through cuDNN, the path whose lse the kernel consumes.
    dtype, tol = (jnp.bfloat16, 5e-2) if ON_GPU else (jnp.float32, 1e-5)
    lengths = [90, 33]
    q, k, v = _inputs(1, 2, 90, 8, 2, 32, dtype)
    got = np.where(np.arange(90)[None, :, None] < np.asarray(lengths)[:, None, None],
                   np.asarray(_lse(q, k, v, lengths, window), np.float64), 0.0)
    np.testing.assert_allclose(got, _numpy_lse(q, k, lengths, window), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "b,t,hq,hkv,d,lengths,window,blocks,dtype",
    [
        (2, 200, 8, 2, 64, [200, 77], None, (32, 16), jnp.bfloat16),  # T not a block multiple
        (1, 128, 4, 4, 32, [128], None, (64, 64), jnp.float16),  # MHA, whole blocks
        (2, 96, 8, 1, 16, [0, 95], 20, (16, 32), jnp.bfloat16),  # one kv-head, window, empty row
        (1, 300, 16, 2, 128, [299], 100, (64, 64), jnp.bfloat16),  # GQA 8, Llama's head_dim
    ],
)
def test_kernel_matches_reference(b, t, hq, hkv, d, lengths, window, blocks, dtype):
    q, k, v = _inputs(2, b, t, hq, hkv, d, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    lse = _lse(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lengths,
               window)
    want = attention_column_sums_reference(q, k, lse, lengths, window=window)
    got = attention_column_sums(q, k, lse, lengths, window=window, implementation="pallas_gpu",
                                interpret=not ON_GPU, block_rows=blocks[0], block_k=blocks[1])
    assert got.shape == (b, hkv, t)
    err = np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
    assert err < 1e-2, err
    past = np.arange(t)[None, None, :] >= np.asarray(lengths)[:, None, None]
    assert np.all(np.where(past, np.asarray(got), 0.0) == 0.0)


def test_each_valid_query_contributes_its_heads_total_probability():
    # Every query row's probabilities sum to one: the kv-head sums add up to heads x queries.
    lengths = jnp.asarray([70, 40], jnp.int32)
    q, k, v = _inputs(3, 2, 70, 8, 2, 32, jnp.bfloat16)
    lse = _lse(q, k, v, lengths, None)
    got = attention_column_sums(q, k, lse, lengths, implementation="pallas_gpu",
                                interpret=not ON_GPU)
    np.testing.assert_allclose(np.asarray(got).sum(axis=(1, 2)), 8 * np.asarray(lengths),
                               rtol=2e-2)


def test_wrong_shapes_and_unknown_implementation_are_user_errors():
    q, k, v = _inputs(4, 1, 16, 4, 2, 16)
    lse = _lse(q, k, v, [16], None)
    lengths = jnp.asarray([16], jnp.int32)
    with pytest.raises(UserError, match="keys"):
        attention_column_sums(q, k[:, :8], lse, lengths)
    with pytest.raises(UserError, match="lse"):
        attention_column_sums(q, k, lse[..., :2], lengths)
    with pytest.raises(UserError, match="implementation"):
        attention_column_sums(q, k, lse, lengths, implementation="cuda")
    with pytest.raises(UserError, match="head_dim"):
        attention_column_sums(q[..., :12], k[..., :12], lse, lengths, implementation="pallas_gpu")
