"""BLE: phones' advertisements (presence) and the store's beacons."""

from drivers.ble.facade import BleDriver

__all__ = ["BleDriver"]
