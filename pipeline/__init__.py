"""asvr.pipeline: tokenize image corpora into code shards (docs/ARCHITECTURE.md, contract 2).

Modules, one job each:
  inputs/     INPUT arguments -> an ordered plan of images: sources.py (registry, detection, discovery),
              one plug-in module per format (folder, webdataset, parquet, llava_json, hf_datasets)
  plan.py     listing jobs (per input, per top-level subfolder) and the duplicate search in Ray tasks;
              the plan kept in OUT/.plan, reused by a resumed run
  stages.py   Ray Data operators: ReadDecode (CPU tasks), Encoder (actor pool, tokenizer built in __init__)
  unit_stages.py  one unit per block: UnitReadDecode (plan rows -> pixels), UnitEncodeWriter (encode,
              then the actor writes the unit's shard + marker and emits its commit record)
  commit.py   the worker-side unit commit (shard, then marker) and the driver's record collection,
              for any job cut into numbered units
  writer.py   OUT: run-config check, shard naming, atomic shards + unit markers, manifest, failures
  runner.py   PipelineConfig -> run_pipeline: wires the above, progress bar, summary
  ray_job.py  the Ray side of a run: start/join Ray, actor sizing, the Ray Data pipeline of the
              coordinator task
  check.py    inspect / verify an OUT (no Ray)
  cli.py      asvr-pipeline tokenize | inspect | verify
  ray_reaper.py  ties a local Ray to its driver (kill -9 included)

The shard format itself (schema, readers, atomic shard writers) is
``asvr.core.shards``: readers never import the pipeline.

Importing this package imports no Ray; runner.py imports it when a job runs.
"""
