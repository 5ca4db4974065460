"""A tiny training corpus for the data/trainer tests: images, code shards written by
the real tokenizer, LLaVA JSON whose texts encode the sample index, a tiny LLM.

(Not a test module: helpers imported by tests/test_train_data*.py and
tests/test_train_trainer*.py.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asvr.core.shards import ShardMeta, rows_to_table, write_parquet_shard, write_webdataset_shard
from conftest import write_image_folder

WORDS = ["red", "green", "blue", "circle", "square", "wave", "stripe", "bright", "dark", "sky", "sea", "field"]


@dataclass
class Corpus:
    root: Path
    images: Path
    codes: Path
    pretrain: Path
    sft: Path
    llm: Path
    keys: list[str]  # every image key in the shards
    codes_by_key: dict[str, np.ndarray]  # uint16 [H, W, D] as encoded here


def caption(i: int) -> str:
    return f"picture {i} : " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 4))


def make_corpus(
    root: Path, tokenizer, n_images: int = 12, n_captioned: int = 9, fmt: str = "parquet", llm: Path | None = None
) -> Corpus:
    """``n_images`` images in 2 shards; the first ``n_captioned`` have a pretrain caption
    and an SFT conversation; the rest are caption-free.  Plus one text-only SFT sample."""
    from asvr.demo.tiny_llm import make_tiny_llm

    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    keys = write_image_folder(images, n_images)
    codes = tokenizer.encode_images([images / k for k in keys]).numpy().astype(np.uint16)
    meta = ShardMeta.from_spec(tokenizer.spec)
    out = root / "codes"
    out.mkdir()
    half = n_images // 2
    for s, (a, b) in enumerate([(0, half), (half, n_images)]):
        table = rows_to_table(
            meta, keys[a:b], codes[a:b], ["0" * 64] * (b - a), [64] * (b - a), [48] * (b - a), [None] * (b - a)
        )
        if fmt == "parquet":
            write_parquet_shard(out / f"part-{s:05d}.parquet", table)
        else:
            write_webdataset_shard(out / f"shard-{s:05d}.tar", table)
    pre = [
        {
            "id": f"pt{i}",
            "image": keys[i],
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption(i)}],
        }
        for i in range(n_captioned)
    ]
    sft = [
        {
            "id": f"sft{i}",
            "image": keys[i],
            "conversations": [
                {"from": "human", "value": f"What is in image {i}?\n<image>"},
                {"from": "gpt", "value": caption(i)},
                {"from": "human", "value": "And the colour?"},
                {"from": "gpt", "value": WORDS[i % 3]},
            ],
        }
        for i in range(n_captioned)
    ]
    sft.append(
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello there"}],
        }
    )
    (root / "pretrain.json").write_text(json.dumps(pre))
    (root / "sft.json").write_text(json.dumps(sft))
    if llm is None:
        llm = make_tiny_llm(
            root / "llm", "llama", [caption(i) for i in range(n_images)] + ["What is in image", "hello there"]
        )
    return Corpus(root, images, out, root / "pretrain.json", root / "sft.json", llm, keys, dict(zip(keys, codes)))


TINY_HEAD = ["--head-width", "64", "--head-proj-hidden", "64", "--head-layers", "1", "--head-dim", "32"]


def train_args(corpus: Corpus, tok_dir, out, *extra, data=None, codes=None, quiet: bool = True) -> list[str]:
    """``asvr-train`` arguments for a tiny run on ``corpus`` (``data``: the pretrain file by default)."""
    return [
        "--model",
        str(corpus.llm),
        "--tokenizer",
        str(tok_dir),
        "--codes",
        str(codes or corpus.codes),
        "--data",
        str(data or corpus.pretrain),
        "--images",
        str(corpus.images),
        "--output-dir",
        str(out),
        "--max-len",
        "256",
        *TINY_HEAD,
        *(["--quiet"] if quiet else []),
        *extra,
    ]
