"""What every benchmark in tools/ ends with: the bounds it checked, as an exit status."""

from __future__ import annotations


def verdict(failures: list[str]) -> int:
    """Print the missed bounds (or that all were met) and return the exit status (1 if any missed).

    >>> sys.exit(verdict(["ratio 2.6 > 2.5"]))
    """
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("all bounds met")
    return 0
