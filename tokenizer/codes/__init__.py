"""asvr.tokenizer.codes."""
