"""Human-readable sizes: parse ``4M`` / ``64KiB`` and print ``1.5 GiB``. Pure functions."""

from __future__ import annotations

import re

from chunkfs.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary unit suffix (K, M, G, T, P; 'iB'/'B' allowed)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 4M, 64KiB, 1G)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(n: float) -> str:
    """Format a byte count with a binary unit, e.g. ``4.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
