"""client.seeding: the trainer's epoch seeds are numpy SeedSequence's, bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest

from client.seeding import epoch_seed


def _numpy_seed(seed: int, index: int, epoch: int) -> int:
    state = np.random.SeedSequence([seed, index, epoch]).generate_state(1, dtype=np.uint64)
    return int(state[0])


# Zero words, one-word and two-word numbers, the model RNG stream (1 << 32), more entropy
# words than the pool holds (so the "remaining entropy" loop runs).
TABLE = [
    (0, 0, 0),
    (0, 0, 1),
    (3, 1, 0),
    (3, 1, 1 << 32),
    (2**32 - 1, 2, 5),
    (2**32, 0, 0),
    (2**64 - 1, 2**32 + 7, 1 << 32),
    (2**96 + 12345, 2**64 + 1, 2**64 + 2),
]


@pytest.mark.parametrize(("seed", "index", "epoch"), TABLE)
def test_epoch_seed_is_numpys_seed_sequence(seed: int, index: int, epoch: int) -> None:
    assert epoch_seed(seed, index, epoch) == _numpy_seed(seed, index, epoch)


def test_epoch_seed_matches_numpy_on_many_random_inputs() -> None:
    rng = random.Random(20261130)
    for _ in range(3000):
        seed = rng.getrandbits(rng.choice([1, 8, 31, 32, 33, 64, 100]))
        index = rng.getrandbits(rng.choice([1, 4, 32, 40]))
        epoch = rng.choice([0, 1, 2, 1 << 32, rng.getrandbits(64)])
        assert epoch_seed(seed, index, epoch) == _numpy_seed(seed, index, epoch), (
            seed,
            index,
            epoch,
        )


@pytest.mark.parametrize("args", [(-1, 0, 0), (0, -1, 0), (0, 0, -5)])
def test_negative_seeds_are_refused_as_numpy_refuses_them(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        np.random.SeedSequence(list(args))
    with pytest.raises(ValueError):
        epoch_seed(*args)


def test_seeds_beyond_the_precomputed_mix_are_still_numpys() -> None:
    for args in [(2**600, 0, 0), (2**480, 2**64, 3), (1, 2**1000, 2**70)]:
        assert epoch_seed(*args) == _numpy_seed(*args)
