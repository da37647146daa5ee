"""Figures for the reliability report: each test records (class, cases, failures).

With NBD_MC_REPORT=FILE set (make soak sets it), every record is appended to FILE
as one JSON line; `python tests/support/reliability.py FILE` prints them as a table.
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


def table(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = ["| fault or input class | cases | failures | figures |", "|---|---:|---:|---|"]
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in ("class", "cases", "failures", "time"))
        out.append(f"| {r['class']} | {r['cases']} | {r['failures']} | {extra} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
