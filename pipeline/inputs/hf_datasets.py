"""Input format ``hf-datasets``: a Hugging Face ``datasets`` folder written by
``Dataset.save_to_disk`` (``state.json``, ``dataset_info.json``, ``data-*.arrow``).

Detected by its ``state.json`` + ``dataset_info.json``.  The image column is
``--image-column``, else the first column with the ``Image`` feature, else the
first of the Parquet defaults (image, jpg, png, ...); keys and captions come
from ``--key-column`` / ``--caption-column`` or the Parquet defaults, else the
key is ``<folder>/<row>``.  Cells are read from the memory-mapped Arrow data
(``with_format("arrow")``): the image bytes are never decoded by ``datasets``,
only by the pipeline's own decode stage.  ``save_to_disk`` embeds the bytes of
images given by path (datasets 5.2), so a cell without bytes is a failure row
at stage ``read``.  A ``DatasetDict`` folder is refused with the split folders
to pass instead.

This module is the whole format: registering it adds it to auto-detection,
``--input-format`` and the read stage (see :mod:`asvr.pipeline.inputs.sources`).
"""

from __future__ import annotations

import json
from pathlib import Path

from asvr.tokenizer.preprocess import ImageError

from asvr.pipeline.inputs.parquet import image_cell_bytes
from asvr.pipeline.inputs.sources import (
    PARQUET_CAPTION_COLUMNS,
    PARQUET_IMAGE_COLUMNS,
    PARQUET_KEY_COLUMNS,
    InputFormat,
    SourceError,
    SourceOptions,
    _pick,
    _Rows,
    register_input_format,
)

NAME = "hf-datasets"
KIND = "hf-datasets"  # plan rows: path = the folder, offset = row index, image_column


def _detect(path: Path) -> bool:
    return path.is_dir() and (
        ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
        or (path / "dataset_dict.json").is_file()
    )


def _load(path: Path):
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"{path}: a Hugging Face datasets folder needs the datasets package (pip install 'asvr[pipeline]')"
        ) from None
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise SourceError(f"{path} holds several splits; pass one of: {', '.join(str(path / s) for s in splits)}")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a broken folder
        raise SourceError(f"{path}: not a readable Hugging Face datasets folder ({type(e).__name__}: {e})") from None


def _scan(path: Path, rows: _Rows, opts: SourceOptions) -> None:
    import datasets

    ds = _load(path)
    names = list(ds.column_names)
    image_features = [c for c in names if isinstance(ds.features[c], datasets.Image)]
    img_col = _pick(names, opts.image_column, (*image_features, *PARQUET_IMAGE_COLUMNS), "image", path)
    if img_col is None:
        raise SourceError(f"{path}: no image column among {', '.join(names)}; pass --image-column")
    key_col = _pick(names, opts.key_column, PARQUET_KEY_COLUMNS, "key", path)
    cap_col = _pick(names, opts.caption_column, PARQUET_CAPTION_COLUMNS, "caption", path)
    table = ds.with_format("arrow", columns=[c for c in (key_col, cap_col) if c])[:] if (key_col or cap_col) else None
    keys = table.column(key_col).to_pylist() if table is not None and key_col else [None] * len(ds)
    caps = table.column(cap_col).to_pylist() if table is not None and cap_col else [None] * len(ds)
    folder = str(path.absolute())
    for i in range(len(ds)):
        key = str(keys[i]) if keys[i] is not None else f"{path.name}/{i}"
        cap = None if caps[i] is None else str(caps[i])
        rows.add(key, f"{path}#row={i}", KIND, folder, i, -1, caption=cap, image_column=img_col)


def _read(row: dict, handles: dict) -> bytes:
    ds = handles.get(("hf-datasets", row["path"]))
    if ds is None:
        try:
            ds = _load(Path(row["path"])).with_format("arrow", columns=[row["image_column"]])
        except SourceError as e:
            raise ImageError(str(e), "read") from None
        handles[("hf-datasets", row["path"])] = ds
    # the Image feature: {bytes, path}; save_to_disk embeds the bytes, so none is a failure
    return image_cell_bytes(ds[row["offset"]].column(0)[0].as_py(), lambda struct: "image cell has no bytes")


register_input_format(
    InputFormat(
        NAME,
        "Hugging Face datasets folder (Dataset.save_to_disk); image from the Image-feature column, "
        "key/caption as for Parquet",
        _scan,
        detect=_detect,
        readers={KIND: _read},
    )
)
