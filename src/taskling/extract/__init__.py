"""extract: TODO."""
