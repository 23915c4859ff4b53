"""NFC: taps on the store's shelf tags and on customers' loyalty cards."""

from drivers.nfc.facade import NfcDriver

__all__ = ["NfcDriver"]
