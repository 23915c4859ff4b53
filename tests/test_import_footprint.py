"""What the daemon imports: nothing it does not use (issue 17: peak RSS <= 64 MiB with the page).

Each check runs in a fresh interpreter, since the test runner has imported half the world already.
scripts/bench_web.py has the RSS figures; these tests keep the causes from coming back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run(code: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return out


def test_daemon_with_page_and_uplink_off_loads_no_unused_library() -> None:
    """structlog's optional rich/greenlet extras (~3 MiB) and cryptography (~8 MiB, needed only to
    sign and verify: uplink, downlink, cloud consent) stay out of a daemon that does not use them."""
    out = run(
        "import json, sys\n"
        "import edge.daemon, edge.health, edge.web.server, edge.supervisor, drivers.registry\n"
        "print(json.dumps({m: m in sys.modules for m in ('rich', 'pygments', 'greenlet', 'cryptography')}))\n"
    )
    assert out == {"rich": False, "pygments": False, "greenlet": False, "cryptography": False}


def test_hidden_extras_stay_importable_and_console_logging_works() -> None:
    """Hiding rich and greenlet from structlog is temporary: whoever imports them later gets them,
    and structlog's console renderer (plain tracebacks, colours) still renders."""
    code = (
        "import io, json, importlib.util\n"
        "import edge.logs, structlog\n"
        "out = io.StringIO()\n"
        "edge.logs.configure_logging('info', 'console', stream=out)\n"
        "try:\n"
        "    raise ValueError('boom')\n"
        "except ValueError:\n"
        "    structlog.get_logger('t').exception('failed', n=1)\n"
        "found = {m: importlib.util.find_spec(m) is not None for m in ('rich', 'greenlet')}\n"
        "ok = {}\n"
        "for m, present in found.items():\n"
        "    if present:\n"
        "        __import__(m)\n"
        "        ok[m] = True\n"
        "print(json.dumps({'text': out.getvalue(), 'imported': ok, 'found': found}))\n"
    )
    out = run(code)
    text = str(out["text"])
    assert "failed" in text
    assert "Traceback" in text
    assert "ValueError: boom" in text
    assert out["imported"] == {m: True for m, present in out["found"].items() if present}


def test_cloud_consent_still_loads_its_codec() -> None:
    """The consent codec (and cryptography) is imported when cloud consent is used, not before."""
    assert importlib.util.find_spec("cryptography") is not None
    out = run(
        "import json, sys\n"
        "import edge.supervisor\n"
        "before = 'edge.downlink.consent' in sys.modules\n"
        "from edge.downlink.consent import ConsentSync\n"
        "print(json.dumps({'before': before, 'after': 'cryptography' in sys.modules}))\n"
    )
    assert out == {"before": False, "after": True}
