"""A desired-state layer from YAML, checked before anything is signed.

A layer is a partial device configuration (downlink-v1 §Desired state): the same key names and
value formats as the device's YAML file, `null` removing a key. `load_layer(path)` refuses it
whole (ConfigError, every problem as `file:line: key.path: ...`, the device loader's wording)
when it touches anything not remotely settable, or when a key or a value type is wrong for the
models the device validates with (edge.config.Config).

What the cloud cannot judge is left to the device, which validates the whole effective
configuration: a required key missing inside a map (the local file or a lower layer may hold
it; maps merge key by key) and checks across sections (e.g. privacy.mode against analytics,
which only the local file sets). A list replaces the lower one whole, so an item of a list must
be complete here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge.config import Config

# the device loader's own parser and problem wording, so a layer reads like `edge check-config`
from edge.configload import _describe, _duplicates, _locate, _parse, _Unusable
from edge.errors import ConfigError
from edge.wire.downlink import REMOTELY_SETTABLE, merge_layers, unsettable_paths

_NEEDS = "expected a mapping of configuration sections a layer may set, e.g. logging: {level: debug}"
_PLACEHOLDER = {"tenant": "layer", "store": "layer", "device": "layer"}


def _settable_text() -> str:
    parts = [name + (f" (except {', '.join(sorted(ex))})" if ex else "") for name, ex in REMOTELY_SETTABLE.items()]
    return ", ".join(parts)


def _plain(value: Any) -> bool:
    """JSON-shaped: what a MessagePack document and canonical JSON both carry unchanged."""
    if value is None or isinstance(value, str | bool | int | float):
        return not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def load_layer(path: str | Path) -> dict[str, Any]:
    """The layer's `config` map as written (nulls kept); ConfigError listing every problem."""
    where = str(path)
    try:
        node, data = _parse(where, _NEEDS)
    except _Unusable as exc:
        raise ConfigError(where, [str(exc)]) from None
    problems = _duplicates(node, (), where)
    bad = unsettable_paths(data)
    for key in bad:
        line = _locate(node, tuple(key.split(".")))
        problems.append((line, f"{where}:{line}: {key}: may not be set remotely; a layer may set "
                               f"{_settable_text()}"))
    problems += _model_problems(where, node, _without(data, bad))  # the rest too: one run lists everything
    if not problems and not _plain(data):
        problems.append((1, f"{where}:1: holds a value that is not text, a number, true/false, null, a list or "
                            "a mapping (a YAML date or binary?): put it in quotes"))
    if problems:
        raise ConfigError(where, [text for _, text in sorted(problems, key=lambda p: p[0])])
    return data


def _without(data: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    out = dict(data)
    for path in paths:
        top, _, sub = path.partition(".")
        if not sub or not isinstance(out.get(top), dict):
            out.pop(top, None)
        else:
            out[top] = {k: v for k, v in out[top].items() if k != sub}
    return out


def _model_problems(where: str, node: Any, data: dict[str, Any]) -> list[tuple[int, str]]:
    body = merge_layers(data)  # nulls removed: they remove a key, which is always allowed
    body.pop("identity", None)
    try:
        Config.model_validate({**body, "identity": _PLACEHOLDER})
    except ValidationError as exc:
        errs = [e for e in exc.errors(include_url=False) if _layer_error(e)]
        return [_describe(e, where, node, body, Config) for e in errs]
    return []


def _layer_error(err: Any) -> bool:
    loc = tuple(err["loc"])
    if not loc:
        return False  # across sections: the device judges it on the effective configuration
    if err["type"] == "missing":
        return any(isinstance(seg, int) for seg in loc)  # inside a list item (lists replace whole)
    return True
