"""Resumable results CSVs shared by the benchmark scripts: rows are appended and synced as they are measured, and a
row cut short by a killed run is dropped on the next read so that it is measured again."""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _num(s: str) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def read_rows(path: Path, fields: Sequence[str], name: str, timed: str = "median_ms") -> list[dict[str, str]]:
    """Rows of a results CSV (empty if absent); a header from another version is an error naming `name`'s fix.

    A row cut short by a killed run (missing fields, no positive `timed` value, or no final newline) is dropped and
    the file rewritten without it, so that row is measured again and later appends start on a fresh line.
    """
    fields = tuple(fields)
    if not path.exists() or path.stat().st_size == 0:
        return []
    text = path.read_text()
    reader = csv.DictReader(text.splitlines())
    if tuple(reader.fieldnames or ()) != fields:
        raise SystemExit(
            f"{name}: {path} has columns {reader.fieldnames}, expected {list(fields)}; "
            "rerun with --fresh or another --out"
        )
    rows = list(reader)
    good = [r for r in rows if None not in r and None not in r.values() and _num(r[timed]) > 0]
    if not text.endswith("\n") and good and good[-1] is rows[-1]:
        good.pop()  # the last line may look complete but be cut inside its final field
    if len(good) != len(rows) or not text.endswith("\n"):
        print(f"{name}: dropped {len(rows) - len(good)} incomplete row(s) from {path}", file=sys.stderr)
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(good)
        os.replace(tmp, path)
    return good


def append_row(path: Path, row: dict[str, Any], fields: Sequence[str]) -> None:
    """Append one row and sync it to disk, so a killed run keeps it."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})
        f.flush()
        os.fsync(f.fileno())
