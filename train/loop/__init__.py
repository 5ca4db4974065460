"""asvr.train.loop."""
