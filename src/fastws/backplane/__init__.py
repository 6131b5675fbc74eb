"""Cross-node fan-out for the hub (a real broker, never a home-made one)."""
