"""asvr.pipeline.output."""
