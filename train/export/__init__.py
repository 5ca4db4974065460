"""asvr.train.export.native."""
