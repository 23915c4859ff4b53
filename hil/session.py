"""One scenario end to end: run it, analyse it, write its report; the API behind `python -m hil`."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hil.checks import Analysis, analyse
from hil.hardware import Rig
from hil.report import write_report
from hil.runner import Run, RunData, Target
from hil.scenario import Scenario


def _workdir(report: Path, name: str, *, keep: bool) -> Path:
    report.mkdir(parents=True, exist_ok=True)
    if not keep:
        return Path(tempfile.mkdtemp(prefix=f"hil-{name}-"))
    workdir = report / f"{name}-state"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    return workdir


@dataclass(slots=True)
class Result:
    data: RunData
    analysis: Analysis
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def skipped(self) -> str | None:
        return self.data.skipped

    @property
    def ok(self) -> bool:
        return self.skipped is not None or self.analysis.ok

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.figure} (expected {c.expected})" for c in self.analysis.checks if c.status == "fail"]


async def run_scenario(
    scenario: Scenario, *, target: Target, report: Path, rig: Rig | None = None, keep: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Result:  # fmt: skip
    """Run `scenario`, write `<report>/<name>.{xml,md,png,json}`; the state is kept with `keep`."""
    workdir = _workdir(report, scenario.name, keep=keep)
    t0 = time.monotonic()
    try:
        data = await Run(scenario, target, workdir, rig=rig, progress=progress).execute()
        analysis = Analysis() if data.skipped else await analyse(data)
        paths = write_report(data, analysis, report, elapsed_s=time.monotonic() - t0)
        return Result(data, analysis, paths)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
