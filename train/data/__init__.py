"""asvr.train.data.dataset."""
