"""asvr.tokenizer.rvq."""
