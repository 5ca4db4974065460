"""asvr.eval.formats."""
