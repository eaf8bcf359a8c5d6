"""The keyed permutation of an epoch (tfgpt.data.order): a permutation for any
size, a function of (seed, epoch) that looks uniformly shuffled, and the same
order whatever batches its positions are computed in."""

import numpy as np
import pytest

from tfgpt.data.order import EpochOrder


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4099])
def test_epoch_order_is_a_permutation(n):
    order = EpochOrder(n, seed=1, epoch=0).numpy(np.arange(n))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_epoch_order_depends_on_seed_and_epoch_and_looks_shuffled():
    n = 10_000
    base = EpochOrder(n, 0, 0).numpy(np.arange(n))
    np.testing.assert_array_equal(base, EpochOrder(n, 0, 0).numpy(np.arange(n)))
    for other in (EpochOrder(n, 0, 1), EpochOrder(n, 1, 0)):
        assert np.mean(other.numpy(np.arange(n)) == base) < 0.01
    # A uniform shuffle: position and index uncorrelated, mean displacement n/3,
    # and every tenth of the indices spread evenly over the epoch.
    assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.05
    assert abs(np.mean(np.abs(base - np.arange(n))) / n - 1 / 3) < 0.02
    counts = np.histogram(np.flatnonzero(base < n // 10), bins=10, range=(0, n))[0]
    assert counts.min() > 60 and counts.max() < 140
    # Positions computed in any batches give the same order (resume mid-epoch).
    order = EpochOrder(n, 0, 0)
    np.testing.assert_array_equal(np.concatenate([order.numpy(np.arange(a, a + 500)) for a in range(0, n, 500)]), base)
