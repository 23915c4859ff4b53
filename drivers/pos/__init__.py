"""POS: receipts from each register's serial link (a receipt-printer tap, STX/ETX frames,
text or JSON lines), parsed into `pos.receipt` by per-link rules."""

from drivers.pos.facade import PosDriver
from drivers.pos.receipt import ReceiptParser, parse_receipt, receipt_parsers

__all__ = ["PosDriver", "ReceiptParser", "parse_receipt", "receipt_parsers"]
