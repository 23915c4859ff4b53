"""`python -m hil`: run scenarios against the real daemon.

    python -m hil run hil/scenarios/store-day.yaml --target sim --report out/
    python -m hil run hil/scenarios/*.yaml --target hw --rig rig.yaml --report out/
    python -m hil list

Exit codes: 0 every scenario passed (or was skipped: hardware absent), 1 a check failed,
2 a scenario file or the command line is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hil.scenario import ScenarioError, load_scenario

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hil", description="store-edge hardware-in-the-loop rig")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run scenarios and write their reports")
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario YAML files (or names in hil/scenarios)")
    p.add_argument("--target", choices=("sim", "hw"), default="sim")
    p.add_argument("--report", default=None, metavar="DIR", help="report folder (default: a temporary one)")
    p.add_argument("--rig", default=None, metavar="FILE", help="--target hw: which devices face which (YAML)")
    p.add_argument("--keep", action="store_true", help="keep each run's state (daemon, receiver, wire) in the report")
    p.add_argument("--quiet", "-q", action="store_true")
    sub.add_parser("list", help="the scenarios shipped in hil/scenarios")
    return ap


def resolve(name: str) -> Path:
    p = Path(name)
    if p.exists() or p.suffix:
        return p
    return SCENARIOS / f"{name}.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "list":
        for f in sorted(SCENARIOS.glob("*.yaml")):
            sc = load_scenario(f)
            first = sc.description.strip().splitlines()[0] if sc.description.strip() else ""
            print(f"{f.stem:<20} {sc.duration:>5g}s  {first}")
        return 0
    try:
        scenarios = [(resolve(s), load_scenario(resolve(s))) for s in args.scenarios]
    except ScenarioError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    from edge.logs import configure_logging
    from hil.hardware import Rig
    from hil.session import run_scenario

    rig = Rig.load(args.rig) if args.rig else Rig()
    report = Path(args.report) if args.report else Path(tempfile.mkdtemp(prefix="hil-report-"))
    report.mkdir(parents=True, exist_ok=True)
    rig_log = (report / "rig.log").open("a", encoding="utf-8")  # the receiver's and capture's logs
    configure_logging("info", "json", rig_log)
    worst = 0
    for path, sc in scenarios:
        say = None if args.quiet else (lambda msg, n=sc.name: print(f"[{n}] {msg}", file=sys.stderr, flush=True))
        result = asyncio.run(run_scenario(sc, target=args.target, report=report, rig=rig, keep=args.keep,
                                          progress=say))  # fmt: skip
        verdict = "SKIPPED" if result.skipped else "PASS" if result.ok else "FAIL"
        print(f"{verdict}: {path.name} ({args.target}) -> {result.paths.get('markdown')}")
        for c in result.analysis.checks:
            if c.status == "fail":
                print(f"  FAIL {c.name}: {c.figure} (expected {c.expected})")
        if not result.ok:
            worst = 1
    return worst


if __name__ == "__main__":
    sys.exit(main())
