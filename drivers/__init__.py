"""Device drivers: one facade per device kind over interchangeable backends."""
