"""asvr.core."""
