"""Pure connection state: entries, per-class LRU expiry, allocators. Time arrives as ``now``."""
