"""asvr.pipeline: tokenize image corpora into code shards (DESIGN.md contract 2).

Modules, one job each:
  sources.py  INPUT arguments -> an ordered plan of images (folder, webdataset, Parquet, LLaVA JSON)
  stages.py   Ray Data operators: ReadDecode (CPU tasks), Encoder (actor pool, tokenizer built in __init__)
  writer.py   OUT: run-config check, work units, atomic shards + unit markers, manifest, failures
  runner.py   PipelineConfig -> run_pipeline: wires the above, progress bar, summary
  check.py    inspect / verify an OUT (no Ray)
  shards.py   the shard format, readers and atomic writers (no Ray; the trainer imports only this)
  cli.py      asvr-pipeline tokenize | inspect | verify
  ray_reaper.py  ties a local Ray to its driver (kill -9 included)

Importing this package imports no Ray; runner.py imports it when a job runs.
"""
