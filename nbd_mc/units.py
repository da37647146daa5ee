"""Sizes as people write and read them: ``64K`` in, ``1.5 MiB`` out (binary units)."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """64K, 2M, 65536, 1MiB ... as bytes; ValueError for anything else."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        return int(num) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 64K, 1M)") from None


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB' (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
