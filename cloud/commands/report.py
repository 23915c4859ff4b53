"""`edge-cloud report --tenant T [--store S] --from YYYY-MM-DD --to YYYY-MM-DD --out report.html`.

Writes one self-contained HTML page (cloud/report.py) of the stores' KPIs over the days from
`--from` to `--to` inclusive, local days of `--tz` (default UTC). The database is reached like
the other db commands (`--dsn`, `--dir` of a local cloud, or $EDGE_CLOUD_DSN). Exit 0 with a
page (saying so when there is no data in the range), 1 when the database fails, 2 on bad
arguments (dates, range, ids, time zone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_DAYS = 366
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def register(sub: Any) -> None:
    from cloud.db.cli import _add_dsn

    p = sub.add_parser("report", help="write a self-contained HTML page of store KPIs (footfall, conversion, dwell)")
    _add_dsn(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--store", default=None, help="only this store (default: every store of the tenant, compared)")
    p.add_argument("--from", dest="day_from", required=True, metavar="YYYY-MM-DD", help="first day (inclusive)")
    p.add_argument("--to", dest="day_to", required=True, metavar="YYYY-MM-DD", help="last day (inclusive)")
    p.add_argument("--tz", default="UTC",
                   help="time zone of the days and hours shown, e.g. Europe/Berlin (default UTC)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the HTML file to write")
    p.set_defaults(func=run)


class _Usage(Exception):
    pass


def _day(flag: str, text: str) -> dt.date:
    bad = _Usage(f"{flag} {text!r}: expected a date YYYY-MM-DD, e.g. 2026-12-04")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise bad
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise bad from None


def _check(args: argparse.Namespace) -> tuple[dt.date, dt.date]:
    for flag, value in (("--tenant", args.tenant), ("--store", args.store)):
        if value is not None and not _ID.fullmatch(value):
            raise _Usage(f"{flag} {value!r}: not an id (lower-case letters, digits, '-' and '_', at most 63)")
    d0, d1 = _day("--from", args.day_from), _day("--to", args.day_to)
    if d1 < d0:
        raise _Usage(f"--to {d1} is before --from {d0}")
    if (d1 - d0).days + 1 > MAX_DAYS:
        raise _Usage(f"the range is {(d1 - d0).days + 1} days; at most {MAX_DAYS} per report")
    try:
        ZoneInfo(args.tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Usage(f"--tz {args.tz!r}: unknown time zone (e.g. UTC, Europe/Berlin)") from None
    return d0, d1


def _write(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a page."""
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # a page of published counts, meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    try:
        d0, d1 = _check(args)
    except _Usage as exc:
        print(f"edge-cloud report: {exc}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if not out.parent.is_dir() or out.is_dir():
        print(f"edge-cloud report: --out {args.out}: "
              f"{'is a folder' if out.is_dir() else 'its folder does not exist'}", file=sys.stderr)
        return 2
    import psycopg

    from cloud.db.cli import _connect
    from cloud.db.errors import DbError
    from cloud.report import load, render

    t0 = time.perf_counter()
    with _connect(args) as conn:
        try:
            rep = load(conn, tenant=args.tenant, store=args.store, day_from=d0, day_to=d1, tz=args.tz)
        except psycopg.errors.UndefinedFunction:
            raise DbError("the database has no KPI views", hint="run edge-cloud db migrate") from None
        except psycopg.Error as exc:
            raise DbError(f"reading the KPIs failed: {type(exc).__name__}: {exc}".strip()) from None
    page = render(rep)
    try:
        _write(out, page)
    except OSError as exc:
        print(f"edge-cloud report: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    what = f"{len(rep.stores)} store(s)" if rep.stores else "no data in the range"
    print(f"wrote {args.out} ({what}, {d0} to {d1}, {len(page) // 1024} KiB, {time.perf_counter() - t0:.2f} s)")
    return 0
