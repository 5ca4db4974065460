"""asvr.demo."""
