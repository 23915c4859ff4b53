"""store-edge: edge runtime for in-store IoT."""

from __future__ import annotations

import sys

__version__ = "0.1.0"

# structlog imports `rich` (tracebacks, console) and `greenlet` (its deprecated threadlocal
# module) whenever they are installed, which here they are for other packages (amqtt's CLI,
# Playwright): ~3 MiB of the daemon's RSS for features it never uses, since edge/logs.py formats
# exceptions to plain text itself before scrubbing. A None entry in sys.modules makes those
# imports fail (as documented for the module cache), so structlog takes its plain fallbacks;
# the entries are removed again, and anything that imports rich or greenlet later gets them.
_UNUSED_BY_STRUCTLOG = ("rich", "greenlet")


def _import_structlog_plain() -> None:
    if "structlog" in sys.modules:
        return
    hidden = [name for name in _UNUSED_BY_STRUCTLOG if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # documented: import raises ImportError
    try:
        import structlog  # noqa: F401
    except ImportError:  # not installed (a bare `import edge`, e.g. a venv built without deps)
        pass
    finally:
        for name in hidden:
            if sys.modules.get(name, sys) is None:
                del sys.modules[name]


_import_structlog_plain()
