"""Debian's headless Chromium driven by Playwright for Python (never a downloaded browser).

`chromium(tmp)` yields a fresh persistent context (its own user-data dir under `tmp`) of
/usr/bin/chromium with background networking, component updates and sync off, so the browser
talks to nothing but the page under test. Without the binary it skips, or fails under CI=true.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def chromium_path() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found is None:
        reason = "Debian's chromium is not installed (apt-get install chromium, or scripts/bootstrap.sh test)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return found


@asynccontextmanager
async def chromium(tmp: Path, *, ignore_https_errors: bool = False) -> AsyncIterator[BrowserContext]:
    exe = chromium_path()
    profile = tmp / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=exe, args=ARGS, headless=True,
            viewport={"width": 1366, "height": 900}, ignore_https_errors=ignore_https_errors,
            locale="en-GB", timezone_id="Europe/Berlin",
        )
        try:
            yield ctx
        finally:
            await ctx.close()
