"""``asvr-train ... --preview N``: the first N training samples as JSON lines, no training.

Each line is what the trainer would feed for one sample (before packing):
``id``, ``image`` (its shard key or null), ``text`` (the rendered
conversation, ``<image>`` where the image goes), ``input_ids`` (image
positions hold the image filler id), ``labels`` (-100 where nothing is
trained), ``image_positions`` (``[start, end)`` ranges) and ``n_tokens``.
The data is read, joined and checked exactly as for training (bad samples
refused or, with ``--skip-bad-samples``, left out); nothing is written to the
run folder and no process group or DeepSpeed is started.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

import numpy as np

from asvr.train.model.config import image_tokens
from asvr.train.data.dataset import Sample, build_training_data, describe_no_placeholder, open_codes
from asvr.train.data.sources import DataError
from asvr.train.data.templates import get_template
from asvr.train.model.vision_input import get_vision_input


def sample_record(s: Sample) -> dict:
    e = s.encoded
    edges = np.flatnonzero(np.diff(np.concatenate([[0], e.image_mask.astype(np.int8), [0]])))
    return {
        "id": s.sample_id,
        "image": s.key,
        "text": e.text,
        "input_ids": e.input_ids.tolist(),
        "labels": e.labels.tolist(),
        "image_positions": edges.reshape(-1, 2).tolist(),
        "n_tokens": len(e),
    }


def preview(cfg, n: int, out: TextIO | None = None) -> int:
    """Print the first ``n`` samples of the run ``cfg`` (a ``TrainConfig``) as JSON lines (to ``out``,
    default the current ``sys.stdout``); -> lines printed."""
    out = out or sys.stdout  # read at call time: a default bound at import kept a closed stream
    from transformers import AutoTokenizer

    from asvr.tokenizer.model import SemanticTokenizer

    tokenizer = SemanticTokenizer.load(cfg.tokenizer)
    llm_tokenizer = AutoTokenizer.from_pretrained(
        cfg.model, local_files_only=True, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.codes is None:
        raise DataError("--preview reads --codes/--data (packed rows are already tokenized)")
    store = open_codes(cfg.codes, tokenizer.spec)
    dcfg = cfg.data_config(image_tokens(tokenizer.spec.grid, cfg.vision_tower_select))
    # images are checked where every step reads them (online); a features cache may hold them already
    data = build_training_data(
        dcfg,
        get_template(cfg.template),
        llm_tokenizer,
        store,
        check_images=get_vision_input(cfg.vision_input).model_runs_tower,
    )
    if not data.samples:
        raise DataError("no training samples")
    if data.no_placeholder:
        print(describe_no_placeholder(data.no_placeholder), file=sys.stderr)
    for s in data.samples[:n]:
        out.write(json.dumps(sample_record(s)) + "\n")
    out.flush()
    return min(n, len(data.samples))
