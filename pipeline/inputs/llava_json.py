"""Input format ``llava``: LLaVA conversation ``.json`` / ``.jsonl`` files.

Each distinct ``image`` (a string or a list) is one input image, read under
``--image-root`` through :func:`asvr.core.paths.confine` (symlinks followed, then
checked): the only format that opens a file named by the data.

Registered like a plug-in; detected (after the plug-ins) by the ``.json`` / ``.jsonl`` suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

from asvr.core.llava_json import LlavaJSONError, read_llava_records
from asvr.core.paths import UnsafePathError, confine, regular_file_error

from asvr.pipeline.inputs.sources import (
    InputFormat,
    SourceError,
    SourceOptions,
    _file_size_error,
    _Rows,
    register_input_format,
)


def _scan_llava(path: Path, rows: _Rows, opts: SourceOptions) -> None:
    image_root = opts.image_root
    if image_root is None:
        raise SourceError(f"{path}: a LLaVA JSON input needs --image-root (the folder its image paths are relative to)")
    root = Path(image_root)
    if not root.is_dir():
        raise SourceError(f"--image-root {image_root} is not a folder")
    try:
        records = read_llava_records(path)
    except LlavaJSONError as e:
        raise SourceError(str(e)) from None
    seen: set[str] = set()
    for rec in records:
        images = rec.get("image") if isinstance(rec, dict) else None
        for image in images if isinstance(images, list) else [images]:
            if not isinstance(image, str) or not image or image in seen:
                continue  # no image, or the same image referenced again: one input image
            seen.add(image)
            try:
                target = str(confine(root, image))
                error = regular_file_error(target)
                if error and not os.path.lexists(target):
                    error = "no such image file under --image-root"
                error = error or _file_size_error(target, opts)
            except UnsafePathError as e:
                target, error = "", str(e).replace("the image root", "--image-root")
            rows.add(image, f"{path}:{image}", "error" if error else "file", target, error=error)


register_input_format(
    InputFormat(
        "llava",
        "*.json/.jsonl LLaVA conversations; each distinct 'image' once, read under --image-root",
        _scan_llava,
        detect=lambda path: path.name.lower().endswith((".json", ".jsonl")),
        detect_last=True,
    )
)
