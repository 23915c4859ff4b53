"""`edge status` and `edge export`: read the buffer from another process, even while the daemon runs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from edge.ackwatch import ack_alarm, refused_acks
from edge.buffer.stats import count_events, iter_events, read_stats
from edge.clock import kernel_clock_synchronized
from edge.config import Config, is_loopback
from edge.configload import load_config
from edge.supervisor import RUNTIME_FILE
from edge.units import format_duration, format_size
from edge.web.access import read_token, token_path


def collect_status(config_path: str) -> dict[str, Any]:
    cfg = load_config(config_path, trust=False)  # reading the buffer needs no trust
    doc: dict[str, Any] = {"device": cfg.identity.device, "buffer": None, "runtime": None}
    # measured here, so it shows even when the daemon is not running
    doc["clock"] = {"synchronized": kernel_clock_synchronized(), "wall_ms": int(time.time() * 1000)}
    if cfg.buffer_path.exists():
        doc["buffer"] = read_stats(cfg.buffer_path).to_json()
    runtime = cfg.paths.state_dir / RUNTIME_FILE
    if runtime.exists():
        try:
            rt = json.loads(runtime.read_text())
            age_s = (time.time() * 1000 - rt.get("updated_ms", 0)) / 1000
            rt["stale"] = rt.get("state") == "running" and age_s > 10
            doc["runtime"] = rt
        except (OSError, ValueError):
            doc["runtime"] = {"state": "unknown"}
    doc["page"] = _page(cfg, doc["runtime"])
    doc["downlink"] = None
    if cfg.downlink_active:
        from edge.downlink.desiredfile import read_summary

        doc["downlink"] = read_summary(cfg.paths.state_dir)
    doc["ack_alarm"] = None
    if cfg.uplink.enabled and doc["buffer"] is not None:
        b, rt_doc = doc["buffer"], doc["runtime"] or {}
        uplink = (rt_doc.get("components") or {}).get("uplink") if rt_doc.get("state") == "running" else None
        alarm = ack_alarm(pending=int(b.get("batches_pending") or 0),
                          oldest_pending_ms=b.get("oldest_pending_sealed_ms"), last_ack_ms=b.get("last_ack_ms"),
                          refused=refused_acks(uplink), now_ms=int(time.time() * 1000),
                          threshold_s=cfg.health.ack_timeout_alarm)
        doc["ack_alarm"] = alarm.to_json() if alarm is not None else None
    return doc


def _page(cfg: Config, runtime: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the store page is and, off loopback, its token (config, or the generated file)."""
    if not cfg.health.enabled:
        return None
    health = ((runtime or {}).get("components") or {}).get("health") or {}
    listen = health.get("listen") or cfg.health.listen
    scheme = "https" if cfg.health.tls.enabled else "http"
    page: dict[str, Any] = {"url": f"{scheme}://{listen}/", "token_required": False, "token": None}
    if not is_loopback(cfg.health.address()[0]):
        page["token_required"] = True
        page["token"] = cfg.health.token or read_token(cfg.paths.state_dir)
        if page["token"] is None:  # not generated yet (daemon never started) or not readable by this user
            page["token_file"] = str(token_path(cfg.paths.state_dir))
    return page


def status_main(config_path: str, *, as_json: bool) -> int:
    doc = collect_status(config_path)
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(_render(doc))
    return 0


def _render(doc: dict[str, Any]) -> str:
    lines = [f"device {doc['device']}"]
    if doc.get("ack_alarm"):
        lines.append(f"ALARM       {doc['ack_alarm']['reason']}")
    rt = doc.get("runtime")
    if rt:
        state = rt.get("state", "unknown") + (" (stale: daemon not updating)" if rt.get("stale") else "")
        clock = "synchronized" if rt.get("clock_synchronized") else "NOT synchronized"
        lines.append(f"daemon      {state}, clock {clock}")
        for d in rt.get("drivers", []):
            reason = f" ({d.get('degraded_reason')})" if d.get("degraded_reason") else ""
            lines.append(f"driver      {d.get('name')}: {d.get('state')}{reason}")
        for name, c in (rt.get("components") or {}).items():
            where = c.get("listen") or c.get("service") or c.get("broker")
            lines.append(f"{name:<11} {c.get('state', '?')}" + (f" ({where})" if where else ""))
            lines += _uplink_lines(c) if name == "uplink" else _dropped_line(c) if name == "downlink" else []
    else:
        lines.append("daemon      not running (no runtime status)")
    if doc.get("downlink"):
        lines += _downlink_lines(doc["downlink"])
    if doc.get("page"):
        lines.append(_page_line(doc["page"]))
    clk = doc.get("clock")
    if clk is not None:
        lines.append(
            "clock       NTP-synchronized"
            if clk.get("synchronized")
            else "clock       NOT synchronized (kernel adjtimex): retention paused, new events flagged clock=unsynced"
        )
    b = doc.get("buffer")
    if not b:
        lines.append("buffer      empty (no database yet)")
        return "\n".join(lines)
    now = time.time() * 1000
    for src, s in sorted(b.get("backlog", {}).items()):
        lines.append(f"backlog     {src:<5} {s['events']:>9} events  {format_size(s['bytes']):>10}")
    oldest = b.get("oldest_unsent_ts")
    if oldest:
        lines.append(f"oldest      {format_duration(max(0.0, (now - oldest) / 1000))} unsent")
    pend, quar = b.get("batches_pending", 0), b.get("batches_quarantined", 0)
    lines.append(f"batches     {pend} sealed pending, {quar} quarantined")
    for key, n in sorted((b.get("drops") or {}).items()):
        lines.append(f"dropped     {key}: {n}")
    last_ack = b.get("last_ack_ms")
    ago = f"{format_duration(max(0.0, (now - last_ack) / 1000))} ago" if last_ack else "never"
    lines.append(f"last ack    {ago}")
    return "\n".join(lines)


def _dropped_line(c: dict[str, Any]) -> list[str]:
    dropped = c.get("dropped") or {}
    shown = ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items()))
    return [f"{' ' * 12}dropped (not applied): {shown}"] if dropped else []


def _downlink_lines(d: dict[str, Any]) -> list[str]:
    """Config layers from the cloud (downlink-v1): ver per layer, effective hash, last apply."""
    layers = d.get("layers") or {}
    out = ["layers      " + ", ".join(f"{k} {layers.get(k, 0)}" for k in ("tenant", "store", "device"))
           + f"; effective {d.get('effective') or '?'}"]
    a = d.get("apply")
    if a:
        line = f"last apply  {a.get('state')}: {a.get('layer')} layer ver {a.get('ver')}"
        errors = a.get("errors") or []
        out.append(line + (f": {'; '.join(errors[:5])}" if errors else ""))
        out += [f"{' ' * 12}... and {len(errors) - 5} more"] * (len(errors) > 5)
    if d.get("trial"):
        out.append(f"{' ' * 12}a change is being tried (health.apply_grace)")
    return out


def _page_line(page: dict[str, Any]) -> str:
    if not page.get("token_required"):
        return f"page        {page['url']} (local only, no token)"
    if page.get("token"):
        return f"page        {page['url']}?token={page['token']} (open once; a cookie keeps it)"
    return f"page        {page['url']} token in {page.get('token_file')} (not readable, or not made yet)"


def _uplink_lines(c: dict[str, Any]) -> list[str]:
    """Trust and rejections of the uplink: what an operator must see without asking."""
    pad = " " * 12
    out = []
    if c.get("unsigned_acks_trusted"):
        out.append(f"{pad}WARNING: acks are NOT verified (uplink.insecure_unsigned_acks, no cloud_public_key): "
                   "anyone on the broker can make this box delete its data")
    rejections = c.get("rejections") or {}
    if rejections:
        shown = ", ".join(f"{reason} {n}" for reason, n in sorted(rejections.items()))
        out.append(f"{pad}rejected by the cloud: {shown} (chain-broken quarantined, others resent later; "
                   f"{c.get('waiting_to_resend', 0)} waiting)")
    ignored = {"unsigned": c.get("acks_unsigned", 0), "bad signature": c.get("acks_forged", 0),
               "malformed": c.get("acks_malformed", 0)}
    if any(ignored.values()):
        out.append(f"{pad}acks ignored: " + ", ".join(f"{k} {n}" for k, n in ignored.items() if n))
    return out


def export_main(config_path: str, out: str) -> int:
    """Write every buffered event as JSON lines to `out` (e.g. a USB stick), fsynced.

    Written to `<out>.partial` first and renamed when complete, so a stick pulled early
    never holds a file that looks whole. On a TTY, a progress bar against the total.
    """
    cfg = load_config(config_path, trust=False)  # a rescue export must work before the cloud key is set
    out_path = Path(out)
    if (problem := out_problem(out_path)) is not None:
        print(f"edge: export --out {out}: {problem}", file=sys.stderr)
        return 2
    if not cfg.buffer_path.exists():
        print(f"edge: no buffer at {cfg.buffer_path}", file=sys.stderr)
        return 1
    bar = _Progress(count_events(cfg.buffer_path)) if sys.stderr.isatty() else None
    n = 0
    tmp = out_path.with_name(out_path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8", opener=private_opener) as fh:
            for ev in iter_events(cfg.buffer_path):
                fh.write(json.dumps(ev, default=_bytes_hex, separators=(",", ":")) + "\n")
                n += 1
                if bar is not None and n % 5_000 == 0:
                    bar.show(n)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out_path)
    except OSError as exc:  # stick full, pulled, read-only: no half file may stay behind
        tmp.unlink(missing_ok=True)
        print(f"edge: export --out {out}: cannot write: {exc.strerror or exc}; nothing was written",
              file=sys.stderr)
        return 1
    if bar is not None:
        bar.show(n, end=True)
    print(f"{n} events written to {out_path}")
    return 0


def private_opener(path: str, flags: int) -> int:
    """`open(..., opener=private_opener)`: a new export file is 0600 whatever the umask (it holds pseudonyms)."""
    fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # also when the file already existed (a leftover .partial)
    return fd


def out_problem(out: Path) -> str | None:
    """Why `out` cannot be the export file (None when it can): a folder, or a missing folder."""
    if out.is_dir():
        return "is a folder; name a file in it, e.g. " + str(out / "events.jsonl")
    parent = out.parent
    if not parent.is_dir():
        return f"the folder {parent} does not exist" if not parent.exists() else f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the folder {parent} is not writable by this user"
    return None


class _Progress:
    """`[#########...........]  45%  450000/1000000 events` on stderr, redrawn in place."""

    WIDTH = 30

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)

    def show(self, n: int, *, end: bool = False) -> None:
        frac = min(n / self.total, 1.0)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        print(f"\r[{bar}] {frac:4.0%}  {n}/{self.total} events", end="\n" if end else "", file=sys.stderr)


def _bytes_hex(o: object) -> str:
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(type(o).__name__)
