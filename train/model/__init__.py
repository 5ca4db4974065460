"""asvr.train.model."""
