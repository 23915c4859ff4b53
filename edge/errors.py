"""One small error tree. Every error an operator may see carries a hint they can act on."""

from __future__ import annotations


class EdgeError(Exception):
    """Root of all store-edge errors."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (hint: {self.hint})" if self.hint else base


class ConfigError(EdgeError):
    """The configuration file is unreadable, not YAML, or fails validation."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: {len(problems)} problem(s)")
        self.path = path
        self.problems = problems


class KeyError_(EdgeError):
    """Key material is missing, unreadable, or has unsafe permissions."""


class BufferError_(EdgeError, OSError):
    """The durable buffer cannot store or read events."""


class StorageFullError(BufferError_):
    """The disk (or the configured bound) is full; the drop policy applies."""


class StartupError(EdgeError):
    """A required component could not start; the daemon exits non-zero."""

    def __init__(self, component: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{component} failed to start: {message}", hint=hint)
        self.component = component


class DriverError(EdgeError, OSError):
    """A device driver backend failed (device absent, unplugged, refused)."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class WireError(EdgeError, ValueError):
    """A batch or ack does not conform to uplink-v1; `reason` is the spec's error code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
