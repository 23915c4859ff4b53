"""Consent of a tenant's customers as 256 signed, retained shards (downlink-v1 §Consent).

Input: a file of lines, each a loyalty number or a stable pseudonym (`loy:s<kid>:<26 base32>`
of any class); `#` starts a comment. A loyalty number becomes the same stable pseudonym every
store of the tenant computes (edge.privacy.pseudonym.stable_pseudonym with the tenant key the
cloud holds: `--tenant-keys DIR` holding `{tenant}/tenant.key`, the devices' file). A raw number
lives only in memory: problems name a line number, never its content, and nothing but
pseudonyms is stored.

`grant` adds members, `revoke` removes them. In one transaction: the members change, every
changed shard gets rev+1 and a new signed document (all of its members, sorted), a revocation
deletes every stored event of the tenant that carries a pseudonym of the file (as the device
does: the pseudonym's text anywhere in the event's data; also for one not consented here, whose
events a store's own consent file may have let through), and an audit row per shard (counts
only). After the commit the changed shards are published, and any shard whose last revision
did not reach the broker before (a failed publish) is republished too: running the command
again finishes an interrupted one. Unchanged shards are not republished.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.db.errors import DbError
from cloud.fleet.context import AConn, audit, cloud_kid, doc_digest
from cloud.fleet.desired import now_ms
from cloud.fleet.publish import Publisher
from edge.clock import SystemClock
from edge.errors import ConfigError
from edge.events import Ident
from edge.privacy.keys import KeyStore
from edge.privacy.pseudonym import stable_pseudonym
from edge.wire.downlink import ALL, consent_shard, consent_topic, document, sign_document

PSEUDONYM_RE: Final = re.compile(r"(ble|nfc|loy|mail|tel):s([0-9a-f]{8}):[a-z2-7]{26}")
MAX_FILE: Final = 64 * 1024 * 1024
Change = Literal["grant", "revoke"]


def tenant_key(keys_dir: Path, tenant: str) -> tuple[str, bytes]:
    """(kid, key) of `keys_dir/{tenant}/tenant.key`, read as the device reads its own."""
    found = KeyStore(keys_dir / tenant, SystemClock()).tenant_key()
    if found is None:
        raise DbError(f"no tenant key for {tenant} in {keys_dir}",
                      hint=f"copy the tenant's key (the devices' tenant.key) to {keys_dir / tenant / 'tenant.key'}"
                           " with mode 600")
    return found


def read_pseudonyms(path: Path, tenant: tuple[str, bytes]) -> set[str]:
    """The stable pseudonyms of the file's lines; ConfigError naming line numbers only."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE:
        raise ConfigError(str(path), [f"{path}: larger than 64 MiB; split it"])
    kid, key = tenant
    out: set[str] = set()
    problems: list[str] = []
    for n, raw_line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        entry = raw_line.split("#", 1)[0].strip()
        if not entry:
            continue
        m = PSEUDONYM_RE.fullmatch(entry)
        if m is not None:
            if m.group(2) != kid:
                problems.append(f"{path}:{n}: a pseudonym of another tenant key (kid {m.group(2)}, this tenant's is "
                                f"{kid}): no device of the tenant computes it")
                continue
            out.add(entry)
        elif ":" in entry:
            problems.append(f"{path}:{n}: neither a loyalty number nor a stable pseudonym (<class>:s<kid>:<26 base32>)")
        else:
            p = stable_pseudonym(Ident("loyalty_id", entry), kid, key)
            if p is not None:
                out.add(p)
    if problems:
        raise ConfigError(str(path), problems)
    return out


@dataclass(slots=True, frozen=True)
class ShardChange:
    shard: str
    rev: int
    members: int
    changed: int  # pseudonyms added or removed in this shard
    events_erased: int = 0


@dataclass(slots=True, frozen=True)
class Outcome:
    shards: list[ShardChange]
    changed: int  # pseudonyms added or removed in all
    unchanged: int  # already as asked
    events_erased: int
    published: list[str]  # shards published now (changed ones and earlier unpublished ones)


async def change(  # noqa: PLR0917 - the context of one change
    conn: AConn, pub: Publisher, key: Ed25519PrivateKey, actor: str, tenant: str, what: Change,
    pseudonyms: Iterable[str],
) -> Outcome:
    wanted = sorted(set(pseudonyms))
    shard_changes: list[ShardChange] = []
    erased_total = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("consent:" + tenant,))
        if what == "grant":
            cur = await conn.execute(
                "INSERT INTO fleet_consent (tenant, pseudonym, shard)"
                " SELECT %s, p, s FROM unnest(%s::text[], %s::text[]) AS x(p, s)"
                " ON CONFLICT (tenant, pseudonym) DO NOTHING RETURNING pseudonym",
                (tenant, wanted, [consent_shard(p) for p in wanted]))
        else:
            cur = await conn.execute("DELETE FROM fleet_consent WHERE tenant = %s AND pseudonym = ANY(%s)"
                                     " RETURNING pseudonym", (tenant, wanted))
        changed = [str(r[0]) for r in await cur.fetchall()]
        by_shard: dict[str, list[str]] = {}
        for p in changed:
            by_shard.setdefault(consent_shard(p), []).append(p)
        for shard, ps in sorted(by_shard.items()):
            erased = await _erase_events(conn, tenant, ps) if what == "revoke" else 0
            erased_total += erased
            shard_changes.append(await _new_revision(conn, key, actor, tenant, shard, what, len(ps), erased))
        if what == "revoke" and (rest := sorted(set(wanted) - set(changed))):
            # not (or no longer) consented here, yet its events may be stored (a store's consent file)
            erased = await _erase_events(conn, tenant, rest)
            erased_total += erased
            if erased:
                await audit(conn, actor, "consent.erase", f"{tenant}/{ALL}/{ALL}",
                            {"pseudonyms": len(rest), "events_erased": erased}, None)
    published = await publish_pending(conn, pub, tenant)
    return Outcome(shard_changes, len(changed), len(wanted) - len(changed), erased_total, published)


async def _erase_events(conn: AConn, tenant: str, pseudonyms: list[str]) -> int:
    """Delete the tenant's stored events carrying any of `pseudonyms` (a stable pseudonym is
    [a-z0-9:] only: its text in the JSON is itself, no escaping), inside the caller's transaction."""
    cur = await conn.execute("DELETE FROM events WHERE tenant = %s"
                             " AND EXISTS (SELECT 1 FROM unnest(%s::text[]) AS p WHERE strpos(data::text, p) > 0)",
                             (tenant, pseudonyms))
    return cur.rowcount


async def _new_revision(  # noqa: PLR0917 - one shard's new revision, in the caller's transaction
    conn: AConn, key: Ed25519PrivateKey, actor: str, tenant: str, shard: str, what: Change, changed: int,
    erased: int,
) -> ShardChange:
    cur = await conn.execute("SELECT rev FROM fleet_consent_shards WHERE tenant = %s AND shard = %s FOR UPDATE",
                             (tenant, shard))
    row = await cur.fetchone()
    rev = (int(row[0]) if row else 0) + 1
    cur = await conn.execute("SELECT pseudonym FROM fleet_consent WHERE tenant = %s AND shard = %s"
                             " ORDER BY pseudonym COLLATE \"C\"", (tenant, shard))
    members = [str(r[0]) for r in await cur.fetchall()]
    envelope = sign_document(document("consent", tenant, ALL, ALL, cloud_kid(key), now_ms(), shard=shard, rev=rev,
                                      consented=members), key)
    digest = doc_digest(envelope)
    await conn.execute(
        "INSERT INTO fleet_consent_shards (tenant, shard, rev, doc, doc_sha256) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant, shard) DO UPDATE SET rev = excluded.rev, doc = excluded.doc,"
        " doc_sha256 = excluded.doc_sha256, updated_at = now()",
        (tenant, shard, rev, envelope, bytes.fromhex(digest)))
    detail = {"shard": shard, "rev": rev, "members": len(members),
              ("added" if what == "grant" else "removed"): changed}
    if what == "revoke":
        detail["events_erased"] = erased
    await audit(conn, actor, f"consent.{what}", f"{tenant}/{ALL}/{ALL}/consent/{shard}", detail, digest)
    return ShardChange(shard, rev, len(members), changed, erased)


async def publish_pending(conn: AConn, pub: Publisher, tenant: str) -> list[str]:
    """Publish (retained) every shard of the tenant whose current rev is not on the broker yet."""
    cur = await conn.execute("SELECT shard, rev, doc FROM fleet_consent_shards"
                             " WHERE tenant = %s AND published_rev < rev ORDER BY shard", (tenant,))
    done = []
    for shard, rev, doc in await cur.fetchall():
        await pub.publish(consent_topic(pub.broker.prefix, tenant, str(shard)), bytes(doc), retain=True)
        async with conn.transaction():
            await conn.execute("UPDATE fleet_consent_shards SET published_rev = %s"
                               " WHERE tenant = %s AND shard = %s AND published_rev < %s", (rev, tenant, shard, rev))
        done.append(str(shard))
    return done
