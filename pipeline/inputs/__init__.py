"""asvr.pipeline.inputs."""
