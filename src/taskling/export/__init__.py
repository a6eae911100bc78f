"""export: TODO."""
