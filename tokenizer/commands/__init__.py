"""asvr.tokenizer.commands."""
