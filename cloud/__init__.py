"""store-edge's cloud side: the ingest core and what runs it (`edge-cloud`).

One ingest core (cloud/core.py): parse/verify (verify.py) -> identity (identity.py) ->
chain/dedupe (chain.py) -> store (store.py seam; sqlite_store.py) -> signed ack (ack.py),
delivered by a transport (transport.py seam; mqtt.py). The wire format lives in
edge/wire/ (shared with the device). `edge-cloud` (cli.py) registers one subcommand group per
module in cloud/commands/. The distributed engine's infrastructure (NATS cluster, JetStream
layout, local PostgreSQL) is in cloud/cluster/, the PostgreSQL schema, registry and tokens in
cloud/db/.
"""
