"""Load the YAML config into a frozen `Config`, with errors an operator can act on.

Every problem names the file, the 1-based line, the dotted key path, the bad value and
what is expected, e.g. `config/store.yaml:12: buffer.max_bytes: '12xb' is not valid:
expected a size such as 512MiB, ...`. All problems are collected and raised together as
one `ConfigError`; nothing else escapes `load_config`.

Relative paths in paths.state_dir, paths.keys_dir, privacy.consent_file, uplink.tls.* and
health.tls.* are resolved against the config file's directory, so the working directory never matters.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from edge.config import ID_PATTERN, TOKEN_PATTERN, Config, is_loopback
from edge.errors import ConfigError
from edge.units import format_duration, format_size, parse_duration, parse_size

MAX_BYTES = 1024 * 1024  # a config larger than this is the wrong file (or /dev/zero)
Loc = tuple[int | str, ...]
Problem = tuple[int, str]  # (line for sorting, the message)
_NEEDS = "expected a mapping with at least identity: {tenant, store, device}"
M = TypeVar("M", bound=BaseModel)


class _Loader(yaml.SafeLoader):
    """SafeLoader whose failing constructors (`!!int ""`, `2024-13-45`) raise YAML errors with a mark."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # PyYAML's constructors raise ValueError, IndexError, ... on bad scalars
            value = f" {_show(node.value)}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read{value} as {node.tag.rsplit(':', 1)[-1]}: {exc}", node.start_mark
            ) from exc


class _Unusable(Exception):
    """The file cannot be read or parsed at all: one problem, no validation."""


# keys whose value is a secret or may carry one (a DSN with a password): named, never echoed
_SECRETS: dict[tuple[object, ...], str] = {("health", "token"): "the token", ("postgres", "dsn"): "the DSN",
                                           ("nats", "servers"): "the server list"}


def load_config(path: str | Path, *, trust: bool = True) -> Config:
    """Read, parse and validate `path`; raise ConfigError listing every problem found.

    `trust=False` (for `edge install`, `keys`, `status`, `export`: they read paths, never talk to
    the broker) accepts the shipped cloud key placeholder as unset and skips the uplink trust
    rules. `edge run` and `edge check-config` always load with `trust=True`.
    """
    cfg = load_model(path, Config, context={"placeholders": not trust}, checks=_trust if trust else None)
    return _resolve_paths(cfg, Path(os.path.abspath(str(path))).parent)


Checks = Callable[[Any, str, yaml.Node], list[tuple[int, str]]]


def load_model(
    path: str | Path, model: type[M], *, needs: str = _NEEDS, context: dict[str, Any] | None = None,
    checks: Checks | None = None,
) -> M:
    """Read, parse and validate `path` as `model` (any pydantic model: the device config, the
    receiver's); ConfigError listing every problem as file:line: key: value, what is expected.
    Paths are returned as written (the caller resolves them). `needs` says what the file holds;
    `context` goes to the model's validators; `checks(model, file, yaml root)` adds problems of a
    valid model (each as (line, text))."""
    where = str(path)
    try:
        node, data = _parse(where, needs)
    except _Unusable as exc:
        raise ConfigError(where, [str(exc)]) from None
    return _validate(where, node, data, model, context=context, checks=checks)


def _validate(
    where: str, node: yaml.Node, data: Any, model: type[M], *, context: dict[str, Any] | None,
    checks: Checks | None,
) -> M:
    problems = _duplicates(node, (), where)
    try:
        cfg = model.model_validate(data, context=context)
    except ValidationError as exc:
        problems += [_describe(err, where, node, data, model) for err in exc.errors(include_url=False)]
    else:
        problems += checks(cfg, where, node) if checks is not None else []
    if problems:
        raise ConfigError(where, [text for _, text in sorted(problems, key=lambda p: p[0])])
    return cfg


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The config file as parsed from YAML, not validated (the base of downlink-v1's effective
    configuration); ConfigError when it cannot be read or parsed."""
    try:
        return _parse(str(path))[1]
    except _Unusable as exc:
        raise ConfigError(str(path), [str(exc)]) from None


def validate_config_data(data: dict[str, Any], *, where: str, base: Path) -> Config:
    """`data` (a merged configuration) validated as `load_config` validates a file (trust rules
    included), relative paths resolved against `base` (the config file's folder); ConfigError
    whose problems read `{where}:{line}: key.path: ...`, lines of `data` dumped as YAML."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    node = yaml.compose(text, Loader=_Loader)
    if node is None or not isinstance(data, dict):
        raise ConfigError(where, [f"{where}:1: the configuration is empty: {_NEEDS}"])
    cfg = _validate(where, node, data, Config, context={"placeholders": False}, checks=_trust)
    return _resolve_paths(cfg, base)


def _parse(where: str, needs: str = _NEEDS) -> tuple[yaml.Node, dict[str, Any]]:
    try:
        with open(where, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise _Unusable(f"{where}: cannot read the file: {getattr(exc, 'strerror', None) or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise _Unusable(f"{where}: larger than {format_size(MAX_BYTES)}; is this the config file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _Unusable(f"{where}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from exc
    loader = None
    try:
        loader = _Loader(text)  # already reads (and may reject) the first characters
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise _Unusable(f"{where}{pos}: invalid YAML: {exc.problem}{context}") from exc
    except yaml.YAMLError as exc:
        raise _Unusable(f"{where}: invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise _Unusable(f"{where}: invalid YAML: nested too deeply") from exc
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise _Unusable(f"{where}:1: the file is empty: {needs}")
    if not isinstance(data, dict):
        found = "nothing (null)" if data is None else _kind(data)
        raise _Unusable(f"{where}:{_line(node)}: the top level must be a mapping of sections; found {found}: "
                        f"{needs}")
    return node, data


def _duplicates(node: yaml.Node, loc: Loc, where: str) -> list[Problem]:
    """YAML keeps the last of two equal keys silently; we call it an error."""
    out: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if (k.tag, k.value) in seen:
                    first = seen[k.tag, k.value]
                    value = _show(v.value) if isinstance(v, yaml.ScalarNode) else "a nested value"
                    out.append((_line(k), f"{where}:{_line(k)}: {_dotted((*loc, k.value))}: {value} is a "
                                          f"duplicate: the key is already set at line {first}; each key "
                                          "may appear once per mapping"))
                seen.setdefault((k.tag, k.value), _line(k))
                out += _duplicates(v, (*loc, k.value), where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicates(item, (*loc, i), where)
    return out


def _trust(cfg: Config, where: str, root: yaml.Node) -> list[Problem]:
    """The uplink's trust rules (edge.config.Uplink.trust_problems), each at its key's line."""
    from edge.downlink.trust import pinned_kids

    out: list[Problem] = []
    state_dir = cfg.paths.state_dir
    if not state_dir.is_absolute():  # paths are resolved after the checks: resolve this one here
        state_dir = Path(os.path.normpath(Path(os.path.abspath(where)).parent / state_dir))
    pinned = cfg.uplink.enabled and cfg.uplink.cloud_public_key is None and bool(pinned_kids(state_dir))
    for key, msg in cfg.uplink.trust_problems(pinned=pinned):
        line = _locate(root, tuple(key.split(".")))
        out.append((line, f"{where}:{line}: {key}: {msg}"))
    return out


def _describe(err: Any, where: str, root: yaml.Node, data: Any, model: type[BaseModel] = Config) -> Problem:
    loc: Loc = tuple(err["loc"])
    kind, msg, ctx = err["type"], str(err["msg"]).removeprefix("Value error, "), err.get("ctx") or {}
    if kind == "value_error" and not loc:  # a check across sections names the key it is about first
        head, _, rest = msg.partition(" ")
        path = tuple(head.split("."))
        if _walk(data, path) is not _NOTHING:
            loc, msg = path, rest
        else:
            return 1, f"{where}:1: {msg}"
    if kind == "value_error" and (sub := re.match(r"@([\w.]+): ", msg)):  # a validator naming the culprit
        loc = (*loc, *(int(p) if p.isdigit() else p for p in sub.group(1).split(".")))
        msg = msg[sub.end():]
    elif kind == "value_error" and isinstance(raw := _walk(data, loc), dict) and msg.split(" ")[0] in raw:
        loc = (*loc, msg.split(" ")[0])  # "card_number is always dropped": point at card_number itself
    if kind == "missing":
        line = _locate(root, loc[:-1])
        expect = _expect(_type_at(loc, model))
        parent = repr(_dotted(loc[:-1])) if len(loc) > 1 else "the top level"
        return line, (f"{where}:{line}: {_dotted(loc)}: required key {str(loc[-1])!r} is missing from "
                      f"{parent}" + (f" (expected {expect})" if expect else ""))
    line = _locate(root, loc)
    if kind == "extra_forbidden":
        names = _field_names(_type_at(loc[:-1], model))
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(names)}"
        return line, f"{where}:{line}: {_dotted(loc)}: unknown key {str(loc[-1])!r}; {hint}"
    value = err.get("input") if (value := _walk(data, loc)) is _NOTHING else value
    value = loc[-2] if loc[-1] == "[key]" else value
    shown = f"key {_show(value)}" if loc[-1] == "[key]" else _show(value)
    if loc in _SECRETS:
        shown = _SECRETS[loc]  # a secret (or may hold one): never echoed, not even a wrong one
    human = _human(kind, msg, ctx, loc, value, model)
    return line, f"{where}:{line}: {_dotted(loc)}: {shown} is not valid: {human}"


def _human(  # noqa: PLR0917 - internal helper of _describe
    kind: str, msg: str, ctx: dict[str, Any], loc: Loc, value: Any, model: type[BaseModel] = Config
) -> str:
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(value), allowed, n=1)
        out = f"expected one of {', '.join(map(repr, allowed))}"
        out += f"; did you mean {close[0]!r}?" if close else ""
    elif kind == "string_pattern_mismatch" and ctx.get("pattern") == ID_PATTERN:
        out = "expected an id: 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
    elif kind == "string_pattern_mismatch" and ctx.get("pattern") == TOKEN_PATTERN:
        out = ("expected 16-128 characters of letters, digits and . _ ~ + / = - "
               "(e.g. from: openssl rand -base64 24)")
    elif kind in _BOUNDS:
        bound, unit = next(iter(ctx.values())), _unit(_type_at(loc, model))
        shown = (f"{bound} bytes" + (f" ({format_size(bound)})" if bound >= 1024 else "") if unit == "size"
                 else format_duration(bound) if unit == "duration" and bound > 0 else f"{bound:g}")
        out = f"expected {_BOUNDS[kind]} {shown}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        out = "expected a mapping" + (" (the section is empty: remove it to use the defaults)"
                                      if value is None else "")
    else:
        out = _TYPES.get(kind, msg)
    if isinstance(value, bool) and kind in ("literal_error", "string_type", "string_pattern_mismatch"):
        out += " (YAML reads yes/no/on/off as true/false: put the value in quotes)"
    return out


_BOUNDS = {"greater_than": "more than", "greater_than_equal": "at least",
           "less_than": "less than", "less_than_equal": "at most"}
_TYPES = {
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "float_parsing": "expected a number",
    "float_type": "expected a number", "bool_parsing": "expected true or false",
    "bool_type": "expected true or false", "string_type": "expected text (put it in quotes)",
    "path_type": "expected a file or folder path", "list_type": "expected a list (lines starting with '- ')",
    "invalid_key": "keys must be text",
}
_NOTHING: Any = object()


def _walk(data: Any, loc: Loc) -> Any:
    """The value as parsed from YAML (before pydantic converted it), or _NOTHING."""
    for seg in loc:
        ok = isinstance(data, dict) and seg in data
        ok = ok or (isinstance(data, list) and isinstance(seg, int) and 0 <= seg < len(data))
        if seg != "[key]":
            data = data[seg] if ok else _NOTHING
    return data


def _locate(node: yaml.Node, loc: Loc) -> int:
    """1-based line of `loc`: its key's line inside a mapping, its own line in a list."""
    line = _line(node)
    for seg in loc:
        if isinstance(node, yaml.MappingNode):
            hits = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(seg)]
            if hits:  # the last one is the one YAML kept
                line, node = _line(hits[-1][0]), hits[-1][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) and 0 <= seg < len(node.value):
            node = node.value[seg]
            line = _line(node)
    return line


def _type_at(loc: Loc, model: type[BaseModel] = Config) -> tuple[Any, list[Any]]:
    """The schema type at `loc` (Optional and Annotated stripped) and its metadata."""
    tp: Any = model
    meta: list[Any] = []
    for seg in loc:
        tp, meta = _strip(tp, meta)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(seg) if isinstance(seg, str) else None
            if field is None:
                return None, []
            tp, meta = field.annotation, list(field.metadata)
        elif get_origin(tp) in (list, tuple) and isinstance(seg, int):
            tp, meta = get_args(tp)[0], []
        elif get_origin(tp) is dict:
            tp, meta = get_args(tp)[0 if seg == "[key]" else 1], []
        else:
            return None, []
    return _strip(tp, meta)


def _strip(tp: Any, meta: list[Any]) -> tuple[Any, list[Any]]:
    while True:
        if get_origin(tp) is Annotated:
            tp, meta = get_args(tp)[0], [*meta, *get_args(tp)[1:]]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in (args := get_args(tp)):
            tp = args[0] if len(args) == 2 and args[1] is type(None) else Any
        else:
            return tp, meta


def _unit(typed: tuple[Any, list[Any]]) -> str:
    funcs = {getattr(m, "func", None) for m in typed[1]}
    return "size" if parse_size in funcs else "duration" if parse_duration in funcs else ""


def _field_names(typed: tuple[Any, list[Any]]) -> list[str]:
    tp = typed[0]
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _expect(typed: tuple[Any, list[Any]]) -> str:
    if names := _field_names(typed):
        return "a mapping with keys " + ", ".join(names)
    if any(getattr(m, "pattern", None) == ID_PATTERN for m in typed[1]):
        return "an id such as 'store-001'"
    return ""


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _kind(data: Any) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}.get(
        type(data), type(data).__name__)


def _dotted(loc: Loc) -> str:
    out = ""
    for seg in loc:
        text = str(seg) if re.fullmatch(r"[\w-]+", str(seg)) else repr(seg)  # odd keys quoted
        if seg != "[key]":
            out += f"[{seg}]" if isinstance(seg, int) and out else f".{text}" if out else text
    return out or "(top level)"


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def rel(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else Path(os.path.normpath(base / p))

    tls, htls = cfg.uplink.tls, cfg.health.tls
    return cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"state_dir": rel(cfg.paths.state_dir),
                                              "keys_dir": rel(cfg.paths.keys_dir)}),
        "privacy": cfg.privacy.model_copy(update={"consent_file": rel(cfg.privacy.consent_file)}),
        "uplink": cfg.uplink.model_copy(update={"tls": tls.model_copy(update={
            "ca_file": rel(tls.ca_file), "cert_file": rel(tls.cert_file), "key_file": rel(tls.key_file)}),
            "auth": cfg.uplink.auth.model_copy(update={"password_file": rel(cfg.uplink.auth.password_file)})}),
        "health": cfg.health.model_copy(update={"tls": htls.model_copy(update={
            "cert_file": rel(htls.cert_file), "key_file": rel(htls.key_file)})}),
    })


def summarize(cfg: Config, path: str | Path) -> str:
    """A one-screen (at most 25 lines) summary for `edge check-config`."""
    i, b, u, p, d = cfg.identity, cfg.buffer, cfg.uplink, cfg.privacy, cfg.drivers
    tls = f"ca {u.tls.ca_file or 'system'}" + (f", client cert {u.tls.cert_file}" if u.tls.cert_file else "")
    drivers = [f"ble {_on(d.ble.backend, d.ble.adapter, d.ble.sim.rate)}"] * d.ble.enabled
    drivers += [f"nfc {_on(d.nfc.backend, d.nfc.device, d.nfc.sim.rate)}"] * d.nfc.enabled
    drivers += [f"pos {x.name} {_on(x.backend, f'{x.port} at {x.baudrate} baud', x.sim.rate)}, {x.framing}"
                for x in d.pos]
    if len(drivers) > 8:
        drivers[7:] = [f"... and {len(drivers) - 7} more pos links"]
    classes = [f"{c} {cp.policy}" + (f" (else {cp.fallback})" if cp.policy == "stable" else "")
               for c, cp in p.classes.items()]
    pad = " " * 11
    lines = [
        f"{path}: OK",
        f"identity   tenant {i.tenant}, store {i.store}, device {i.device}",
        f"state      {cfg.paths.state_dir} (buffer {b.file}, synchronous {b.synchronous})",
        f"keys       {cfg.paths.keys_dir}",
        f"buffer     at most {format_size(b.max_bytes)}" + f" / {b.max_events} events" * bool(b.max_events)
        + f"; when full: {b.when_full}; priority {' > '.join(b.priorities)}",
        f"{pad}retention " + ", ".join(f"{src} {format_duration(s)}" for src, s in b.retention.items()),
        (f"uplink     {u.broker} (prefix {u.prefix})" + (f"; downlink on, apply grace "
                                                          f"{format_duration(cfg.health.apply_grace)}"
                                                          if cfg.downlink_active else "; downlink off"))
        if u.enabled else "uplink     disabled",
        f"{pad}TLS: off" if u.broker.startswith("mqtt://") else f"{pad}TLS: {tls}",
        f"{pad}window {u.window} batches, ack timeout {format_duration(u.ack_timeout)}, "
        f"acks {_ack_trust(cfg)}",
        *[("drivers    " if n == 0 else pad) + line for n, line in enumerate(drivers or ["none enabled"])],
        f"privacy    {', '.join(classes[:3])}",
        f"{pad}{', '.join(classes[3:])}",
        f"{pad}ephemeral rotation {format_duration(p.ephemeral_rotation)}; "
        f"consent file {p.consent_file or 'none'}",
        _health_line(cfg),
        f"logging    {cfg.logging.level}, format {cfg.logging.format}",
    ]
    return "\n".join(lines)


def _ack_trust(cfg: Config) -> str:
    from edge.downlink.trust import pinned_kids

    pinned = pinned_kids(cfg.paths.state_dir)
    if cfg.uplink.cloud_public_key:
        return "signed by the cloud key" + (f" (or pinned {', '.join(pinned)})" if pinned else "")
    if pinned:
        return f"signed by a pinned cloud key ({', '.join(pinned)}; edge enroll)"
    return "UNSIGNED (insecure_unsigned_acks: lab only)"


def _health_line(cfg: Config) -> str:
    h = cfg.health
    if not h.enabled:
        return "health     disabled"
    scheme = "https" if h.tls.enabled else "http"
    host, _ = h.address()
    access = ("local only, no token" if is_loopback(host)
              else "token from config" if h.token else "token in state dir (edge status shows it)")
    return f"health     {scheme}://{h.listen} (page /, /metrics, /healthz; {access})"


def _on(backend: str, device: str | None, rate: float) -> str:
    return f"simulated, {rate:g} readings/s" if backend == "sim" else f"{backend} on {device}"


def file_problems(cfg: Config, path: str | Path) -> list[str]:
    """Problems with files the config names that `edge run` would only meet at run time."""
    from edge.privacy.consent import consent_file_problem

    out = []
    consent = cfg.privacy.consent_file
    if consent is not None and (why := consent_file_problem(consent)) is not None:
        out.append(f"{path}: privacy.consent_file: {consent} {why}; until fixed nobody counts as consented")
    return out


def check_config_main(path: str) -> int:
    """`edge check-config PATH`: summary and 0, or one line per problem on stderr and 2.

    Beyond the schema it runs every start-up check of `edge run` that needs no network
    (edge/preflight.py): keys, tenant key, TLS files, serial ports, state folder.
    """
    from edge.preflight import startup_problems

    try:
        cfg = load_config(path)
        problems = startup_problems(cfg, path) + file_problems(cfg, path)
        text = summarize(cfg, path)
    except ConfigError as exc:
        problems = exc.problems
    except Exception as exc:  # an operator tool prints a message, never a traceback
        problems = [f"{path}: unexpected error while checking: {type(exc).__name__}: {exc}"]
    if not problems:
        print(text)
        return 0
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} problem(s) in {path}", file=sys.stderr)
    return 2
