"""monitor: TODO."""
