"""evaluate: TODO."""
