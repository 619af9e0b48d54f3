"""The trainer's seeds: :func:`epoch_seed`, numpy's ``SeedSequence`` mixing in plain ints.

Contract (pure: no I/O, no state but a cache of answers):

* :func:`epoch_seed` is ``int(np.random.SeedSequence([seed, partition_index,
  epoch]).generate_state(1, dtype=np.uint64)[0])`` for non-negative ints, bit for bit
  (the same seeds as every earlier fedtray: a run and a checkpoint stay reproducible
  across versions). It computes numpy's algorithm (its entropy words, hash mix and pool
  of :data:`POOL_SIZE` words) in Python ints, without the arrays numpy allocates for
  three small numbers (numbers of more than 16 words in all go to numpy itself): the
  server seeds each round anew, so a round's two seeds are never remembered ones, and
  numpy's way cost a cache-cold training process about twice the CPU. Answers are
  remembered (an epoch's seed is asked again on a retry).
* Raises ``ValueError`` for a negative argument (numpy refuses them too).
"""

from __future__ import annotations

import functools

__all__ = ["POOL_SIZE", "epoch_seed"]

#: numpy's ``DEFAULT_POOL_SIZE``: the 32-bit words of a SeedSequence's pool.
POOL_SIZE = 4

_MASK32 = 0xFFFF_FFFF
_INIT_A = 0x43B0_D7E5
_MULT_A = 0x931E_8875
_INIT_B = 0x8B51_F9DD
_MULT_B = 0x58F3_8DED
_MIX_MULT_L = 0xCA01_F9DD
_MIX_MULT_R = 0x4973_F715
_XSHIFT = 16


def _words(value: int) -> list[int]:
    """``value`` as numpy's entropy words: 32-bit little-endian words, ``[0]`` for 0."""
    if value < 0:
        raise ValueError(f"seeds must be non-negative, got {value}")
    if value == 0:
        return [0]
    words = []
    while value:
        words.append(value & _MASK32)
        value >>= 32
    return words


def _hash_constants(count: int, init: int, mult: int) -> tuple[tuple[int, int], ...]:
    """The first ``count`` (xor, multiplier) pairs of numpy's hash mix: its constant
    evolves the same way whatever is mixed, so each call's pair is known in advance."""
    pairs = []
    const = init
    for _ in range(count):
        after = (const * mult) & _MASK32
        pairs.append((const, after))
        const = after
    return tuple(pairs)


#: Enough pairs for up to :data:`_MAX_WORDS` entropy words (4 + 12 + 4 per word over 4).
_MAX_WORDS = 16
_MIX_A = _hash_constants(
    POOL_SIZE * POOL_SIZE + POOL_SIZE * (_MAX_WORDS - POOL_SIZE), _INIT_A, _MULT_A
)
_MIX_B = _hash_constants(2, _INIT_B, _MULT_B)


def _pool(entropy: list[int]) -> list[int]:
    """numpy's ``SeedSequence.mix_entropy`` of ``entropy`` words (at most
    :data:`_MAX_WORDS`) into a fresh pool."""
    consts = iter(_MIX_A)
    pool = []
    for i in range(POOL_SIZE):  # hashmix of each entropy word (0 past the end)
        xor, mult = next(consts)
        value = (((entropy[i] if i < len(entropy) else 0) ^ xor) * mult) & _MASK32
        pool.append(value ^ (value >> _XSHIFT))
    # Then every word mixed into every other, and any words past the pool into each.
    pairs = [(src, dst) for src in range(POOL_SIZE) for dst in range(POOL_SIZE) if src != dst]
    sources = [pool] * len(pairs) + [entropy] * (POOL_SIZE * (len(entropy) - POOL_SIZE))
    pairs += [(src, dst) for src in range(POOL_SIZE, len(entropy)) for dst in range(POOL_SIZE)]
    for (src, dst), words in zip(pairs, sources, strict=True):
        xor, mult = next(consts)
        value = ((words[src] ^ xor) * mult) & _MASK32
        value ^= value >> _XSHIFT
        result = (_MIX_MULT_L * pool[dst] - _MIX_MULT_R * value) & _MASK32
        pool[dst] = result ^ (result >> _XSHIFT)
    return pool


def _state64(pool: list[int]) -> int:
    """numpy's ``generate_state(1, dtype=np.uint64)`` of ``pool``: two 32-bit words, the
    first the low half (as numpy views them on every machine)."""
    words = []
    for i, (xor, mult) in enumerate(_MIX_B):
        value = ((pool[i % POOL_SIZE] ^ xor) * mult) & _MASK32
        words.append(value ^ (value >> _XSHIFT))
    return words[0] | (words[1] << 32)


@functools.lru_cache(maxsize=256)
def epoch_seed(seed: int, partition_index: int, epoch: int) -> int:
    """The shuffle seed of one epoch (module docstring)."""
    entropy = _words(seed) + _words(partition_index) + _words(epoch)
    if len(entropy) > _MAX_WORDS:  # numbers beyond any real seed: numpy's own way
        import numpy as np

        state = np.random.SeedSequence([seed, partition_index, epoch]).generate_state(
            1, dtype=np.uint64
        )
        return int(state[0])
    return _state64(_pool(entropy))
