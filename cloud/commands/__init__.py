"""`edge-cloud` subcommand groups, one module each, each with `register(subparsers)` (cloud/cli.py)."""
