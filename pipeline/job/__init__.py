"""asvr.pipeline.job."""
