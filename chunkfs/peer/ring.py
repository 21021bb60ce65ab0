"""Which peer owns a block: rendezvous (highest random weight) hashing over the live peers.

Layer: a leaf of ``peer/``. Every node computes the same order from the same member list, so
a block's requests meet at one owner, which downloads it from the store once. When a member
joins or leaves, only the blocks it owns (or comes to own) move: about 1/N of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(member: str, bid: bytes) -> int:
    digest = hashlib.blake2b(bid, key=member.encode()[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(bid: bytes, members: Iterable[str]) -> list[str]:
    """``members`` ordered by their claim on ``bid``: the first is its owner, the next ones
    take over, in order, should it be gone."""
    return sorted(set(members), key=lambda m: (score(m, bid), m), reverse=True)
