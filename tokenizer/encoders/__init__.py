"""asvr.tokenizer.encoders.base."""
