-- 0001: the store of record for a chain of stores (issue 15).
--
-- devices            registry: which Ed25519 key may sign as which (tenant, store, device)
-- enrollment_tokens  one-time tokens per downlink-v1 §Enrollment (secret encrypted, see below)
-- chains             one row per device: its current chain epoch and highest seq; the row a
--                    worker locks (SELECT ... FOR UPDATE) to serialize one device's batches
-- batches            dedupe and chain per epoch: one row per stored batch
-- events             the events, partitioned by day of capture time (retention drops partitions)
-- rejected_batches   quarantine: what was refused, why, and a bounded head of the payload
--
-- Ids follow uplink-v1: [a-z0-9][a-z0-9_-]{0,62}. Times are timestamptz (UTC); device clocks
-- (header "t", event "ts") are kept as the device sent them, in Unix ms, beside them.

CREATE DOMAIN edge_id AS text CHECK (VALUE ~ '^[a-z0-9][a-z0-9_-]{0,62}$');
CREATE DOMAIN sha256 AS bytea CHECK (octet_length(VALUE) = 32);

CREATE TABLE devices (
    kid          text PRIMARY KEY CHECK (kid ~ '^[0-9a-f]{16}$'),
    public_key   bytea NOT NULL UNIQUE CHECK (octet_length(public_key) = 32),
    tenant       edge_id NOT NULL,
    store        edge_id NOT NULL,
    device       edge_id NOT NULL,
    state        text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    enrolled_with text,  -- token_id when registered by enrollment, NULL when added by hand
    CHECK ((state = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX devices_identity ON devices (tenant, store, device);

-- The secret is needed in clear to check the request's HMAC and to MAC the reply, so it is not
-- hashed: it is stored encrypted (AES-256-GCM, 12-byte nonce || ciphertext || tag, the token_id
-- as associated data) under the cloud's token key, a file outside the database. A copy of the
-- database alone cannot enroll a device.
CREATE TABLE enrollment_tokens (
    token_id       text PRIMARY KEY CHECK (token_id ~ '^[a-z0-9]{8,64}$'),
    secret_sealed  bytea NOT NULL CHECK (octet_length(secret_sealed) = 12 + 32 + 16),
    tenant         edge_id NOT NULL,
    store          edge_id NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    used_by_device edge_id,
    used_by_pub    bytea CHECK (octet_length(used_by_pub) = 32),
    CHECK (expires_at > created_at),
    CHECK ((used_at IS NULL) = (used_by_device IS NULL) AND (used_at IS NULL) = (used_by_pub IS NULL))
);

CREATE TABLE chains (
    tenant     edge_id NOT NULL,
    store      edge_id NOT NULL,
    device     edge_id NOT NULL,
    epoch      integer NOT NULL CHECK (epoch >= 1),
    highest    bigint NOT NULL CHECK (highest >= 1),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, store, device)
);

CREATE TABLE batches (
    tenant      edge_id NOT NULL,
    store       edge_id NOT NULL,
    device      edge_id NOT NULL,
    epoch       integer NOT NULL CHECK (epoch >= 1),
    seq         bigint NOT NULL CHECK (seq >= 1),
    hh          sha256 NOT NULL,   -- SHA-256 of the header bytes: what acks and the next prev name
    prev        sha256 NOT NULL,
    kid         text NOT NULL,
    linked      boolean NOT NULL,  -- anchored to its epoch's seq 1 through held batches
    detached    boolean NOT NULL DEFAULT false,  -- moved out of its epoch's chain (kept, deduplicated)
    n           integer NOT NULL CHECK (n >= 1),
    first_id    bigint NOT NULL,
    last_id     bigint NOT NULL,
    sealed_ms   bigint NOT NULL,   -- header "t" (device clock)
    synced      boolean NOT NULL,  -- header "sync"
    received_at timestamptz NOT NULL DEFAULT now(),
    -- dedupe: an exact resend (same seq, same header hash) of a batch from any epoch is a duplicate
    PRIMARY KEY (tenant, store, device, seq, hh)
);
-- the chain: one live batch per (epoch, seq); a detached one (an old-epoch replay) steps aside
CREATE UNIQUE INDEX batches_epoch_seq ON batches (tenant, store, device, epoch, seq) WHERE NOT detached;

CREATE TABLE events (
    tenant      edge_id NOT NULL,
    store       edge_id NOT NULL,
    device      edge_id NOT NULL,
    epoch       integer NOT NULL,
    seq         bigint NOT NULL,   -- the batch that carried it
    id          bigint NOT NULL,   -- the device's event id
    ts          timestamptz NOT NULL,  -- capture time: the partition key
    ts_ms       bigint NOT NULL,       -- capture time exactly as sent
    src         text NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (ts);
CREATE INDEX events_device_id ON events (tenant, store, device, epoch, id);

-- One partition per UTC day, created on demand: `edge_event_partition(day)` returns the
-- partition's name, creating it when missing (concurrent callers serialize on an advisory
-- lock). Writers call `edge_ensure_event_partitions(lo, hi)` in a short transaction of its own
-- before the transaction that inserts, so the lock a new partition takes on the parent is
-- never held across a batch group.
CREATE FUNCTION edge_event_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'events_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(part) IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('edge_event_partition'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                part,
                day::timestamp AT TIME ZONE 'UTC',
                (day + 1)::timestamp AT TIME ZONE 'UTC');
        END IF;
    END IF;
    RETURN part;
END $$;

CREATE FUNCTION edge_ensure_event_partitions(lo timestamptz, hi timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d date := (lo AT TIME ZONE 'UTC')::date;
    last date := (hi AT TIME ZONE 'UTC')::date;
    made integer := 0;
BEGIN
    IF last < d THEN
        RAISE EXCEPTION 'edge_ensure_event_partitions: hi before lo';
    END IF;
    IF last - d > 400 THEN  -- one call never creates more than 401 partitions
        RAISE EXCEPTION 'edge_ensure_event_partitions: span of % days exceeds 400', last - d;
    END IF;
    WHILE d <= last LOOP
        IF to_regclass('events_' || to_char(d, 'YYYYMMDD')) IS NULL THEN
            PERFORM edge_event_partition(d);
            made := made + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN made;
END $$;

-- Retention: drop every daily partition that ends on or before `before` (a DROP, not a DELETE:
-- no bloat, no vacuum). Returns how many were dropped.
CREATE FUNCTION edge_drop_event_partitions(before date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_[0-9]{8}$'
        ORDER BY c.relname
    LOOP
        IF to_date(substr(part.relname, 8), 'YYYYMMDD') + 1 <= before THEN
            EXECUTE format('DROP TABLE %I', part.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- Quarantine. Nothing here is trusted: every text is length-bounded, and at most the first 64 KiB
-- of a payload are kept (its size and SHA-256 identify the whole).
CREATE TABLE rejected_batches (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at    timestamptz NOT NULL DEFAULT now(),
    topic          text CHECK (octet_length(topic) <= 512),
    tenant         text CHECK (octet_length(tenant) <= 63),
    store          text CHECK (octet_length(store) <= 63),
    device         text CHECK (octet_length(device) <= 63),
    seq            bigint,
    hh             bytea CHECK (octet_length(hh) = 32),
    kid            text CHECK (octet_length(kid) <= 64),
    reason         text NOT NULL CHECK (reason ~ '^[a-z][a-z-]{0,31}$'),
    authenticated  boolean NOT NULL,  -- signature and body hash verified (the core records only these)
    detail         text NOT NULL CHECK (octet_length(detail) <= 1024),
    size           bigint CHECK (size >= 0),
    payload_sha256 sha256,
    payload_head   bytea CHECK (octet_length(payload_head) <= 65536)
);
CREATE INDEX rejected_batches_time ON rejected_batches (received_at);
CREATE INDEX rejected_batches_device ON rejected_batches (tenant, store, device);
