"""The distributed engine's infrastructure: a NATS cluster (JetStream + MQTT) and PostgreSQL.

One module per concern: `natsconf` renders node configs and the broker permission template,
`nats` runs a local cluster, `postgres` a local PostgreSQL, `jetstream` declares the streams and
the shared consumer, `local` ties them together for `edge-cloud up/down`.
"""
