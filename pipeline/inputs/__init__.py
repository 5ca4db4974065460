"""asvr.pipeline.inputs: INPUT formats.  ``sources.py``: the plan types, the registry, detection and
discovery; one plug-in module per built-in format (folder, webdataset, parquet, llava_json,
hf_datasets), each registering itself as a user's format would."""
