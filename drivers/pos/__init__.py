"""POS: receipt text from a tap on each register's receipt printer line."""

from drivers.pos.facade import PosDriver
from drivers.pos.receipt import parse_receipt

__all__ = ["PosDriver", "parse_receipt"]
