"""Figures for the reliability report: each test records (class, cases, failures).

With NBD_MC_REPORT=FILE set (make soak sets it), every record is appended to FILE
as one JSON line; `python tests/support/reliability.py FILE` prints them as a table.

A long class run in parts (tests of their own, spread over pytest-xdist's workers,
each recording its figures as soon as it ends) records one line per part, with the
same class name and a figure ``part``: the table adds the parts up into one row
(numbers summed, a figure named ``*_max`` by its maximum, lists joined into the
set of their items, printed as its size) and says how many it saw,
so a part that never ran shows as a smaller ``parts``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def record(fault_class: str, cases: int, failures: int, **figures) -> None:
    path = os.environ.get("NBD_MC_REPORT")
    if not path:
        return
    line = {"class": fault_class, "cases": cases, "failures": failures, "time": time.time(),
            **figures}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def merged(rows: list[dict]) -> list[dict]:
    """The rows in order, the parts of one class (rows with a ``part``) added up
    into one row where its first part was."""
    out: list[dict] = []
    sums: dict[str, dict] = {}
    for r in rows:
        if "part" not in r:
            out.append(r)
            continue
        m = sums.get(r["class"])
        if m is None:
            m = sums[r["class"]] = {k: v for k, v in r.items() if k != "part"}
            m["parts"] = 1
            out.append(m)
            continue
        m["parts"] += 1
        for k, v in r.items():
            if k in ("class", "time", "part") or isinstance(v, bool):
                continue
            if isinstance(v, list):
                m[k] = sorted(set(m.get(k, [])) | set(v))
            elif isinstance(v, (int, float)):
                m[k] = max(m.get(k, v), v) if k.endswith("_max") else m.get(k, 0) + v
    return out


def table(path: str) -> str:
    try:
        with open(path) as f:
            rows = merged([json.loads(line) for line in f if line.strip()])
    except FileNotFoundError:  # no class got as far as its figures: pytest said why
        return f"no class recorded its figures ({path} does not exist)"
    out = ["| fault or input class | cases | failures | figures |", "|---|---:|---:|---|"]
    for r in rows:
        extra = ", ".join(f"{k}={len(v) if 'parts' in r and isinstance(v, list) else v}"
                          for k, v in r.items() if k not in ("class", "cases", "failures", "time"))
        out.append(f"| {r['class']} | {r['cases']} | {r['failures']} | {extra} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
