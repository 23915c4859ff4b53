"""Desired configuration from the cloud (downlink-v1 §Desired state): layers, apply, rollback.

Effective configuration = the local YAML file, then the tenant, store and device layers
(`merge_layers`). For each layer topic the device keeps the highest `ver` it attempted; a
document with a `ver` not above it (a replay, a reordered retained copy, the retained copy of a
change it rolled back) is ignored and counted (`stale`). A layer touching a key that is not
remotely settable is rejected whole with every such key path. Otherwise the whole effective
configuration is validated exactly as `edge check-config` does (schema, trust rules and the
start-up checks of edge/preflight.py: keys, TLS files, serial ports, state folder; no network);
any problem: `rejected` with every problem's key path, nothing changes.

Applying. A change confined to `drivers` (and not to the BLE presence settings store analytics
is built from) is applied live: only the drivers it touched are stopped and started again with
it (`Runtime.reconfigure_drivers`). Any other change restarts the daemon (drain as on SIGTERM,
exit 75, the service manager starts it again; no committed event is lost). Either way
`desired.json` in the state folder (edge/downlink/desiredfile.py, atomic, 0600) first holds the
accepted signed documents as `current`, the ones before as `previous`, and a `trial`. `edge run`
builds its configuration from the persisted documents (re-verified with the trusted cloud keys:
`boot_config`), so a reboot without network runs the same effective hash.

The trial: the components the change touched (its drivers; the buffer always) are watched for
`health.apply_grace`: healthy for a short settle time -> `applied`; not healthy by the end ->
`previous` becomes `current` again, `rolled-back` with the reason (live: the drivers go back;
otherwise another restart). A daemon that dies during a trial it started with, or during a live
trial, is rolled back at its next start.

A change that leaves the effective hash as it is (e.g. a new `ver` with the same content) is
recorded as applied at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge.config import Config
from edge.configload import read_config_data, validate_config_data
from edge.downlink.desiredfile import DesiredFile, read_state, write_state
from edge.downlink.trust import FileTrustedKeys
from edge.errors import ConfigError
from edge.wire.downlink import (
    LAYERS,
    Document,
    DocumentError,
    desired_topic,
    effective_hash,
    merge_layers,
    unsettable_paths,
    verify_document,
)

log = structlog.get_logger("edge.downlink.desired")

EFFECTIVE = "effective"  # the `where` of problems of the effective configuration
SETTLE_S = 1.0  # touched components must stay healthy this long (at most a third of the grace)
MAX_ERRORS = 50  # problems listed in one apply result


def provisioned_keys(cfg: Config) -> list[bytes]:
    key = cfg.uplink.cloud_public_key
    return [bytes.fromhex(key)] if key else []


def layer_topic(prefix: str, identity: tuple[str, str, str], layer: str) -> str:
    tenant, store, device = identity
    if layer == "tenant":
        return desired_topic(prefix, tenant)
    if layer == "store":
        return desired_topic(prefix, tenant, store)
    return desired_topic(prefix, tenant, store, device)


# -- the effective configuration -------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Effective:
    cfg: Config
    merged: dict[str, Any]
    hash: str


def config_hash(merged: Mapping[str, Any]) -> str:
    # YAML may hold values JSON has no type for (a date): hashed by their text
    return effective_hash(json.loads(json.dumps(merged, default=str)))


def build_effective(config_path: str, docs: Mapping[str, Document], *, checks: bool = True) -> Effective:
    """Merge and validate as `edge check-config` does; ConfigError (problems as `effective: key: ...`)."""
    from edge.configload import file_problems
    from edge.preflight import startup_problems

    data = read_config_data(config_path)
    merged = merge_layers(data, *(docs[lay].body["config"] for lay in LAYERS if lay in docs))
    base = Path(os.path.abspath(config_path)).parent
    cfg = validate_config_data(merged, where=EFFECTIVE, base=base)
    if checks:
        problems = startup_problems(cfg, EFFECTIVE) + file_problems(cfg, EFFECTIVE)
        if problems:
            raise ConfigError(EFFECTIVE, problems)
    return Effective(cfg, merged, config_hash(merged))


def key_paths(problems: list[str]) -> list[str]:
    """`effective:12: drivers.pos[0].port: ...` -> `drivers.pos[0].port: ...` (no file, no line)."""
    out = []
    for p in problems:
        text = p.removeprefix(f"{EFFECTIVE}:")
        head, sep, rest = text.partition(":")
        if sep and head.strip().isdigit():
            text = rest
        out.append(text.strip())
    return out[:MAX_ERRORS]


def verified_layers(raw: Mapping[str, bytes], *, prefix: str, identity: tuple[str, str, str],
                    trusted: FileTrustedKeys) -> dict[str, Document]:
    """The persisted documents that still verify on their own layer's topic (a retired key's are dropped)."""
    out: dict[str, Document] = {}
    for layer in LAYERS:
        payload = raw.get(layer)
        if payload is None:
            continue
        try:
            out[layer] = verify_document(payload, topic=layer_topic(prefix, identity, layer), prefix=prefix,
                                         trusted=trusted.keys())
        except DocumentError as exc:
            log.error("desired_persisted_dropped", layer=layer, reason=exc.reason)
    return out


@dataclass(slots=True)
class Boot:
    """What `edge run` starts with: the effective configuration and the documents it is made of."""

    effective: Effective
    docs: dict[str, Document]
    state: DesiredFile
    trusted: FileTrustedKeys
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # logged once logging is set up


def _identity(cfg: Config) -> tuple[str, str, str]:
    i = cfg.identity
    return i.tenant, i.store, i.device


def _record(st: DesiredFile, eff: Effective, docs: Mapping[str, Document]) -> None:
    st.layers = {lay: (docs[lay].ver if lay in docs else 0) for lay in LAYERS}
    st.effective = eff.hash


def boot_config(config_path: str, local: Config) -> Boot:
    """The effective configuration `edge run` runs with (downlink active): the persisted layers
    over the local file. A trial the previous daemon never decided is rolled back; layers that no
    longer validate (the local file changed) are set aside and the local file alone applies."""
    state_dir = local.paths.state_dir
    st = read_state(state_dir)
    trusted = FileTrustedKeys(state_dir, provisioned_keys(local))
    notes: list[tuple[str, dict[str, Any]]] = []
    prefix, ident = local.uplink.prefix, _identity(local)
    if st.trial is not None:
        boots = int(st.trial.get("boots", 0)) + 1
        st.trial["boots"] = boots
        if boots > 1:  # the daemon with this change stopped (crashed, killed) before it decided
            reason = "the daemon stopped during its apply_grace with this configuration"
            notes.append(("desired_rolled_back", {"layer": st.trial.get("layer"), "ver": st.trial.get("ver"),
                                                  "reason": reason}))
            st.apply = {"state": "rolled-back", "layer": st.trial.get("layer"), "ver": st.trial.get("ver"),
                        "errors": [reason]}
            st.current, st.previous, st.trial = st.previous or {}, None, None
    docs = verified_layers(st.current, prefix=prefix, identity=ident, trusted=trusted)
    try:
        eff = build_effective(config_path, docs)
    except ConfigError as exc:
        notes.append(("desired_invalid_at_start", {"errors": key_paths(exc.problems),
                                                   "effect": "runs with the local configuration alone"}))
        docs = {}
        data = read_config_data(config_path)
        eff = Effective(local, data, config_hash(data))
        st.trial = None
    _record(st, eff, docs)
    write_state(state_dir, st)
    return Boot(eff, docs, st, trusted, notes)


def local_boot(config_path: str, local: Config) -> Boot:
    """Without a downlink: the local file alone (nothing persisted is read)."""
    data = read_config_data(config_path)
    trusted = FileTrustedKeys(local.paths.state_dir, provisioned_keys(local))
    return Boot(Effective(local, data, config_hash(data)), {}, DesiredFile(), trusted)


# -- the running daemon's side ------------------------------------------------------------------


def touched(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What a change touched: top-level sections, and drivers by kind (ble, nfc) or name (pos:x)."""
    sections = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    drivers: list[str] = []
    od, nd = old.get("drivers") or {}, new.get("drivers") or {}
    if isinstance(od, Mapping) and isinstance(nd, Mapping):
        drivers += [k for k in ("ble", "nfc") if od.get(k) != nd.get(k)]

        def links(d: Mapping[str, Any]) -> dict[str, Any]:
            pos = d.get("pos")
            return {str(x.get("name")): x for x in pos if isinstance(x, Mapping)} if isinstance(pos, list) else {}

        ol, nl = links(od), links(nd)
        drivers += [f"pos:{n}" for n in sorted(set(ol) | set(nl)) if ol.get(n) != nl.get(n)]
    return {"sections": sections, "drivers": drivers}


Unhealthy = Callable[[Mapping[str, Any]], "str | None"]
Live = Callable[[Config, Collection[str]], Awaitable[None]]


def live_change(old: Mapping[str, Any], new: Mapping[str, Any], what: Mapping[str, Any]) -> bool:
    """A change the running daemon applies by restarting only the drivers it touched: `drivers`
    only, and not the BLE presence settings (store analytics is built from them at start)."""
    if what.get("sections") != ["drivers"]:
        return False

    def presence(cfg: Mapping[str, Any]) -> Any:
        ble = (cfg.get("drivers") or {}).get("ble")
        return ble.get("presence") if isinstance(ble, Mapping) else None

    return bool(presence(old) == presence(new))


@dataclass(slots=True, frozen=True)
class Watch:
    """How the daemon judges a change: `unhealthy(touched)` -> reason or None, for `grace` seconds."""

    unhealthy: Unhealthy
    grace: float
    monotonic: Callable[[], float]


class DesiredState:
    """The desired-state side of the downlink component (one per daemon)."""

    def __init__(self, *, config_path: str, boot: Boot, state_dir: Path, restart: Callable[[], None],
                 changed: Callable[[], None], watch: Watch, live: Live | None = None) -> None:
        self._config_path = config_path
        self._st = boot.state
        self._docs = dict(boot.docs)
        self._effective = boot.effective
        self._state_dir = state_dir
        self._restart = restart
        self._changed = changed  # publish `reported`
        self._watch = watch
        self._live = live
        self.restarting = False
        self.counters: dict[str, int] = {"stale": 0, "applied": 0, "rejected": 0, "rolled_back": 0, "held": 0,
                                         "live": 0, "restarts": 0}
        self._held: dict[str, Document] = {}  # newer layers that arrived during a trial
        self._task: asyncio.Task[None] | None = None  # a live trial being watched

    @property
    def in_trial(self) -> bool:
        return self._st.trial is not None

    @property
    def effective_hash(self) -> str:
        return self._effective.hash

    def layers(self) -> dict[str, int]:
        return {lay: (self._docs[lay].ver if lay in self._docs else 0) for lay in LAYERS}

    def apply_result(self) -> dict[str, Any] | None:
        return self._st.apply

    def status(self) -> dict[str, Any]:
        return {"layers": self.layers(), "effective": self._effective.hash, "apply": self._st.apply,
                "trial": self._st.trial, **self.counters}

    def _persist(self) -> None:
        write_state(self._state_dir, self._st)

    def _seen_ver(self, layer: str) -> int:
        cur = self._docs[layer].ver if layer in self._docs else 0
        return max(cur, self._st.attempted.get(layer, 0))

    async def handle(self, doc: Document) -> None:
        layer, ver = str(doc.body["layer"]), doc.ver
        if ver <= self._seen_ver(layer):
            self.counters["stale"] += 1
            log.info("desired_ignored", reason="stale", layer=layer, ver=ver, applied=self._seen_ver(layer))
            return
        if self.restarting:
            return  # the retained copy comes again after the restart
        if self.in_trial:
            self._held[layer] = doc  # decided after the trial
            self.counters["held"] += 1
            return
        config = doc.body["config"]
        bad = unsettable_paths(config)
        if bad:
            await self._reject(layer, ver, [f"{p}: not remotely settable" for p in bad])
            return
        candidate = {**self._docs, layer: doc}
        try:
            eff = await asyncio.to_thread(build_effective, self._config_path, candidate)
        except ConfigError as exc:
            await self._reject(layer, ver, key_paths(exc.problems))
            return
        self._st.attempted[layer] = ver
        await self._apply(layer, ver, candidate, eff)

    async def _apply(self, layer: str, ver: int, candidate: dict[str, Document], eff: Effective) -> None:
        if eff.hash == self._effective.hash:  # same content (e.g. a new ver of the same layer)
            self._docs, self._effective = candidate, eff
            self._st.current = {k: d.raw for k, d in candidate.items()}
            await self._trial_ok({"layer": layer, "ver": ver})
            return
        what = touched(self._effective.merged, eff.merged)
        live = self._live is not None and live_change(self._effective.merged, eff.merged, what)
        self._st.previous = {k: d.raw for k, d in self._docs.items()}
        self._st.current = {k: d.raw for k, d in candidate.items()}
        # a live trial counts as this boot's: a daemon that dies during it is rolled back at its next start
        self._st.trial = {"layer": layer, "ver": ver, "boots": 1 if live else 0, "touched": what,
                          "from": self._effective.hash, "to": eff.hash, "live": live}
        await asyncio.to_thread(self._persist)
        if live and self._live is not None:
            log.info("desired_apply_live", layer=layer, ver=ver, effective=eff.hash, touched=what)
            # watched in its own task: commands and consent shards are not held up by the grace
            self._task = asyncio.create_task(self._live_trial(self._live, candidate, eff, what["drivers"]),
                                             name="downlink:live-trial")
            return
        log.info("desired_apply_restart", layer=layer, ver=ver, effective=eff.hash, touched=what)
        self.restarting = True
        self.counters["restarts"] += 1
        self._restart()

    async def _live_trial(self, live: Live, candidate: dict[str, Document], eff: Effective,
                          drivers: list[str]) -> None:
        old_docs, old_eff = self._docs, self._effective
        self._docs, self._effective = candidate, eff
        self.counters["live"] += 1
        try:
            await live(eff.cfg, drivers)
            ok = await self.watch_trial()
        except asyncio.CancelledError:
            raise  # the daemon stops: the persisted trial is rolled back at the next start
        except Exception as exc:  # reconfiguring failed half-way: back to the previous drivers
            log.exception("desired_apply_live_failed", error=type(exc).__name__)
            await self._rollback(f"applying failed: {type(exc).__name__}", restart=False)
            ok = False
        if not ok:
            self._docs, self._effective = old_docs, old_eff
            _record(self._st, old_eff, old_docs)
            await asyncio.to_thread(self._persist)
            await live(old_eff.cfg, drivers)
            self._changed()
            await self._take_held()

    async def close(self) -> None:
        """Stop a live trial still being watched (its persisted trial is rolled back at the next start)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _reject(self, layer: str, ver: int, errors: list[str]) -> None:
        self._st.attempted[layer] = ver
        self._st.apply = {"state": "rejected", "layer": layer, "ver": ver, "errors": errors[:MAX_ERRORS]}
        await asyncio.to_thread(self._persist)
        self.counters["rejected"] += 1
        log.warning("desired_rejected", layer=layer, ver=ver, errors=errors[:MAX_ERRORS])
        self._changed()

    async def watch_trial(self) -> bool:
        """Decide the trial (this daemon started with it, or applied it live): applied once the
        touched components are healthy for SETTLE_S, rolled back when they are not by the end of
        the grace. True when applied."""
        trial = self._st.trial
        if trial is None:
            return True
        what = trial.get("touched") or {}
        w = self._watch
        start = w.monotonic()
        settle = min(SETTLE_S, w.grace / 3)
        healthy_since: float | None = None
        while w.monotonic() - start < w.grace:
            reason = w.unhealthy(what)
            now = w.monotonic()
            if reason is None:
                healthy_since = now if healthy_since is None else healthy_since
                if now - healthy_since >= settle:
                    break
            else:
                healthy_since = None
            await asyncio.sleep(0.2)
        reason = w.unhealthy(what)
        if reason is not None:
            await self._rollback(reason, restart=not trial.get("live"))
            return False
        await self._trial_ok(trial)
        await self._take_held()
        return True

    async def _take_held(self) -> None:
        """Newer layers that came during the trial, now that it is decided."""
        held, self._held = self._held, {}
        for doc in sorted(held.values(), key=lambda d: LAYERS.index(str(d.body["layer"]))):
            await self.handle(doc)

    async def _trial_ok(self, trial: Mapping[str, Any]) -> None:
        self._st.apply = {"state": "applied", "layer": trial.get("layer"), "ver": trial.get("ver"), "errors": []}
        self._st.trial = None
        self._st.previous = None
        _record(self._st, self._effective, self._docs)
        await asyncio.to_thread(self._persist)
        self.counters["applied"] += 1
        log.info("desired_applied", layer=trial.get("layer"), ver=trial.get("ver"), effective=self._effective.hash)
        self._changed()

    async def _rollback(self, reason: str, *, restart: bool) -> None:
        trial = self._st.trial or {}
        self._st.apply = {"state": "rolled-back", "layer": trial.get("layer"), "ver": trial.get("ver"),
                          "errors": [reason]}
        self._st.current = self._st.previous or {}
        self._st.previous = None
        self._st.trial = None
        self._st.effective = str(trial.get("from") or self._st.effective)
        await asyncio.to_thread(self._persist)
        self.counters["rolled_back"] += 1
        log.error("desired_rolled_back", layer=trial.get("layer"), ver=trial.get("ver"), reason=reason)
        if restart:
            self.restarting = True
            self._restart()
