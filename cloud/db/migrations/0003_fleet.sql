-- 0003: fleet management per downlink-v1 (issue 16): what the cloud told the devices, what they
-- answered, and who did what.
--
-- fleet_desired        every signed `desired` document per topic (tenant, store, device; `_all`
--                      where the topic has it), its ver (strictly increasing per topic: the next one
--                      is taken under the topic's advisory lock), the layer as set and its hash
-- fleet_commands       one row per command document sent to one device, and its cmd-result
-- fleet_consent_shards one row per (tenant, shard): its current rev and the rev last published
-- fleet_consent        the consented stable pseudonyms of a tenant (the content of the shards)
-- fleet_device_state   the latest status (online/offline, last will), reported state and
--                      cmd-result of each device, as the control workers stored them
-- fleet_audit          append-only: every config publish, command and consent change (who, when,
--                      what, target, the signed document's SHA-256); never a pseudonym in clear.
--                      A trigger refuses UPDATE, DELETE and TRUNCATE.

CREATE DOMAIN edge_target AS text CHECK (VALUE = '_all' OR VALUE ~ '^[a-z0-9][a-z0-9_-]{0,62}$');

CREATE TABLE fleet_desired (
    tenant       edge_id NOT NULL,
    store        edge_target NOT NULL,
    device       edge_target NOT NULL,
    layer        text NOT NULL CHECK (layer IN ('tenant', 'store', 'device')),
    ver          bigint NOT NULL CHECK (ver >= 1),
    config       jsonb NOT NULL,           -- the layer's partial configuration, nulls kept (they remove keys)
    config_hash  text NOT NULL CHECK (config_hash ~ '^[0-9a-f]{64}$'),  -- effective_hash of the layer
    doc          bytea NOT NULL,           -- the signed envelope, exactly as published (retained)
    doc_sha256   sha256 NOT NULL,          -- SHA-256 of its `d`
    kid          text NOT NULL,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,              -- NULL: stored but the publish failed (a later ver supersedes it)
    PRIMARY KEY (tenant, store, device, ver),
    CHECK ((layer = 'tenant') = (store = '_all' AND device = '_all')),
    CHECK ((layer = 'store') = (store <> '_all' AND device = '_all')),
    CHECK ((layer = 'device') = (store <> '_all' AND device <> '_all'))
);

CREATE TABLE fleet_commands (
    id          text PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 64),
    tenant      edge_id NOT NULL,
    store       edge_id NOT NULL,
    device      edge_id NOT NULL,
    name        text NOT NULL CHECK (octet_length(name) <= 64),
    args        jsonb NOT NULL,
    exp_ms      bigint NOT NULL,           -- the document's `exp` (Unix ms)
    doc_sha256  sha256 NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'unsent', 'ok', 'error')),
    error       text CHECK (octet_length(error) <= 32),    -- the cmd-result's code when state = 'error'
    detail      text CHECK (octet_length(detail) <= 1024),
    result      jsonb,
    result_at   timestamptz
);
CREATE INDEX fleet_commands_device ON fleet_commands (tenant, store, device, created_at);

CREATE TABLE fleet_consent_shards (
    tenant        edge_id NOT NULL,
    shard         text NOT NULL CHECK (shard ~ '^[0-9a-f]{2}$'),
    rev           bigint NOT NULL CHECK (rev >= 1),
    published_rev bigint NOT NULL DEFAULT 0,  -- < rev: the last change is not on the broker yet
    doc           bytea NOT NULL,             -- the signed envelope of rev (republished as it is)
    doc_sha256    sha256 NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, shard)
);

CREATE TABLE fleet_consent (
    tenant     edge_id NOT NULL,
    pseudonym  text NOT NULL CHECK (pseudonym ~ '^[a-z]+:s[0-9a-f]{8}:[a-z2-7]{26}$'),
    shard      text NOT NULL CHECK (shard ~ '^[0-9a-f]{2}$'),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, pseudonym)
);
CREATE INDEX fleet_consent_shard ON fleet_consent (tenant, shard);

CREATE TABLE fleet_device_state (
    tenant       edge_id NOT NULL,
    store        edge_id NOT NULL,
    device       edge_id NOT NULL,
    status       text CHECK (status IN ('online', 'offline')),
    status_at    timestamptz,              -- when the cloud stored the last status
    last_seen    timestamptz,              -- last message of any kind from the device
    software     text CHECK (octet_length(software) <= 64),  -- from reported
    reported     jsonb,
    reported_at  timestamptz,
    last_cmd_id  text,
    last_cmd_ok  boolean,
    last_cmd_at  timestamptz,
    PRIMARY KEY (tenant, store, device)
);

CREATE TABLE fleet_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL CHECK (octet_length(actor) <= 128),
    action      text NOT NULL CHECK (action ~ '^[a-z][a-z.-]{0,31}$'),  -- config.set, cmd.send, consent.grant, ...
    target      text NOT NULL CHECK (octet_length(target) <= 256),      -- topic-like: tenant/store/device
    detail      jsonb NOT NULL DEFAULT '{}',  -- counts and versions only, never a pseudonym
    doc_sha256  sha256                        -- of the signed document's `d`
);
CREATE INDEX fleet_audit_at ON fleet_audit (at);

CREATE FUNCTION fleet_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fleet_audit is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER fleet_audit_no_update BEFORE UPDATE OR DELETE ON fleet_audit
    FOR EACH ROW EXECUTE FUNCTION fleet_audit_append_only();
CREATE TRIGGER fleet_audit_no_truncate BEFORE TRUNCATE ON fleet_audit
    FOR EACH STATEMENT EXECUTE FUNCTION fleet_audit_append_only();
