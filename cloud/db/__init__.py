"""The PostgreSQL store of record: schema migrations, the device registry, enrollment tokens."""
