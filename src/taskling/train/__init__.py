"""train: TODO."""
