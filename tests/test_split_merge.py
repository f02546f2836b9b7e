"""The split-merge kernel against a NumPy transcription of flash-decoding's merge."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.split_merge import merge_splits

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def _numpy_merge(acc, m, l):
    """out = sum_s e^(m_s - M) acc_s / L, L = sum_s e^(m_s - M) l_s, lse = M + log L (float64)."""
    acc, m, l = (np.asarray(x, np.float64) for x in (acc, m, l))
    out = np.zeros(acc.shape[:2] + acc.shape[3:])
    lse = np.full(m.shape[:2] + m.shape[3:], -np.inf)
    for idx in np.ndindex(*m.shape[:2]):
        for g in range(m.shape[3]):
            ms, ls, accs = m[idx][:, g], l[idx][:, g], acc[idx][:, g]
            seen = np.isfinite(ms)
            if not seen.any():
                continue
            big = ms[seen].max()
            w = np.exp(ms[seen] - big)
            total = (w * ls[seen]).sum()
            out[idx][g] = (w[:, None] * accs[seen]).sum(0) / total
            lse[idx][g] = big + np.log(total)
    return out, lse


@pytest.mark.parametrize("n_splits,g,d", [(1, 4, 32), (7, 3, 64), (200, 2, 128)])
def test_merge_matches_numpy(n_splits, g, d):
    b, h = 2, 3
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(n_splits), 3)
    acc = jax.random.normal(k1, (b, h, n_splits, g, d), jnp.float32)
    m = 20 * jax.random.normal(k2, (b, h, n_splits, g), jnp.float32)
    l = jax.random.uniform(k3, (b, h, n_splits, g), jnp.float32, 1.0, 50.0)
    # Empty splits (m = -inf, l = 0, acc = 0): the last split of batch 0, every split of (1, 2).
    empty = jnp.zeros((b, h, n_splits, g), bool).at[0, :, -1].set(True).at[1, 2].set(True)
    m = jnp.where(empty, -jnp.inf, m)
    l = jnp.where(empty, 0.0, l)
    acc = jnp.where(empty[..., None], 0.0, acc)
    out, lse = merge_splits(acc, m, l, interpret=jax.default_backend() != "gpu")
    ref_out, ref_lse = _numpy_merge(acc, m, l)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], rtol=1e-5)
    assert np.all(np.asarray(out)[1, 2] == 0)
