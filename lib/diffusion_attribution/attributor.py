"""The Attributor facade (placeholder while it is written)."""
