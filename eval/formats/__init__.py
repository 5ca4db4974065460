"""asvr.eval.formats: benchmark layouts.  ``base.py``: the item and format types, the registry,
detection and ``read_bench``; one plug-in module per built-in layout (jsonl, pope, mme, mmbench,
scienceqa), each registering itself as a user's layout would."""
