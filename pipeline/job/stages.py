"""The two Ray Data operators: ``ReadDecode`` (CPU tasks) and ``Encoder`` (an actor pool).

Read + decode + resize run in one CPU task per block: bytes never travel
between processes, only the resized pixels do.  The decode stage stops at
*uint8* ``[S, S, 3]`` pixels; the float normalisation ``(x/255 - mean)/std``
happens in the encode actor, on its device.  That moves 4x fewer bytes through
the object store and over PCIe (SigLIP@384: 442 KB/image instead of 1.77 MB)
and gives the same float32 values as
:func:`asvr.tokenizer.preprocess.preprocess`: uint8 -> float32 is exact and the
three IEEE float32 operations are the same (the tests check codes equal
``SemanticTokenizer.encode_images``).

Every image yields exactly one output row: ``ok`` with pixels, or a failure
with ``stage`` (read | decode | preprocess) and a readable ``error``.  Only
per-image problems become failure rows; an exception while *encoding* a batch
(device lost, out of memory) is systemic and stops the job, whose finished
shards a rerun keeps.

Measured (bench/pipeline_gpu.py, one H200, SigLIP-so400m-sized tokenizer, 27x27x8
codes of 16384, batch 64): in the actor, H2D + normalise 18.8k img/s, encoder
470 img/s in bf16 autocast (67 in fp32), RVQ 185 img/s -> ``Encoder`` 181 img/s
(bf16) / 55 (fp32); decode + resize of 1024x768 JPEGs to 384: 866 img/s on 15
processes (2932 with ``--fast-decode``).  So one GPU actor is bound by the RVQ
search, then the encoder; decode keeps up with 15 cores.

The encode actor gets a :class:`TokenizerBuilder` (a path and options), never a
model object, and loads the tokenizer once in ``__init__``: actors pickle
cleanly and a cluster node loads weights from its own disk.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asvr.core.paths import UnsafePathError, read_regular
from asvr.tokenizer.preprocess import _RESAMPLE, ImageError, PreprocessConfig, open_image

from asvr.pipeline.inputs.parquet import parquet_cell_bytes
from asvr.pipeline.inputs.sources import row_reader


def resize_uint8(img, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> uint8 ``[S, S, 3]``: the reference's pad/resize, before normalisation."""
    try:
        img = cfg.preprocess_mode.canvas(img, cfg.background, cfg.max_pixels)
        img = img.resize((cfg.image_size, cfg.image_size), resample=_RESAMPLE[cfg.resample])
        return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - any PIL failure is this image's failure
        raise ImageError(f"cannot preprocess: {type(e).__name__}: {e}", stage="preprocess") from None


def decode_one(data: bytes, cfg: PreprocessConfig) -> tuple[np.ndarray, int, int]:
    """bytes -> (uint8 pixels [S, S, 3], original width, height) or :class:`ImageError`."""
    with warnings.catch_warnings():  # PIL warns between max_pixels/2 and max_pixels; we decide in open_image
        warnings.simplefilter("ignore")
        img = open_image(data, cfg)
        return resize_uint8(img, cfg), img.size[0], img.size[1]


class _Reader:
    """Reads one block's bytes; keeps the open tar and the last Parquet row group."""

    def __init__(self) -> None:
        self._files: dict[str, BinaryIO] = {}
        self._tars: dict[str, tarfile.TarFile] = {}
        self._handles: dict = {}  # plug-in formats' open datasets (see sources.InputFormat)
        self._rg: tuple[str, int, pa.Array] | None = None

    def close(self):
        for t in self._tars.values():
            t.close()
        for f in self._files.values():
            f.close()

    def _file(self, path: str) -> BinaryIO:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        return f

    def _span(self, path: str, offset: int, size: int) -> bytes:
        f = self._file(path)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ImageError(f"tar is truncated: wanted {size} bytes at offset {offset}, got {len(data)}", "read")
        return data

    def _sparse(self, path: str, header: int, size: int) -> bytes:
        """A sparse member (GNU ``S`` or PAX ``GNU.sparse.*`` 0.0/0.1/1.0), holes filled with zeros
        by :mod:`tarfile` from the header at byte ``header``."""
        try:
            tar = self._tars.get(path)
            if tar is None:
                tar = self._tars[path] = tarfile.open(fileobj=self._file(path), mode="r:")
            tar.fileobj.seek(header)
            info = tarfile.TarInfo.fromtarfile(tar)
        except tarfile.TarError as e:
            raise ImageError(f"unreadable sparse tar member header at byte {header} ({e})", "read") from None
        if not info.issparse() or info.size != size:
            raise ImageError(
                f"the tar changed since it was listed (no sparse member of {size} bytes at {header})", "read"
            )
        f = tar.extractfile(info)
        try:
            data = f.read() if f is not None else b""
        except tarfile.TarError as e:  # the archive ends inside the member's data
            raise ImageError(f"sparse tar member is truncated: wanted {size} bytes ({e})", "read") from None
        if len(data) != size:
            raise ImageError(f"sparse tar member is truncated: wanted {size} bytes, got {len(data)}", "read")
        return data

    def image(self, row: dict) -> bytes:
        kind = row["kind"]
        if kind in ("error", "input"):  # input: a whole input cut short (verify reports it)
            raise ImageError(row["error"], "read" if kind == "error" else "input")
        if kind == "file":
            try:
                return read_regular(row["path"])  # never blocks on a FIFO swapped in after discovery
            except UnsafePathError as e:
                raise ImageError(f"cannot read file: {e}", "read") from None
        if kind in ("tar", "tar-sparse"):
            read = self._span if kind == "tar" else self._sparse
            try:
                return read(row["path"], row["offset"], row["size"])
            except OSError as e:
                raise ImageError(f"cannot read tar: {e.strerror or e}", "read") from None
        if kind != "parquet":
            plug = row_reader(kind)
            if plug is None:
                raise ImageError(f"no reader for plan rows of kind {kind!r}", "read")
            return plug(row, self._handles)
        return self._parquet_cell(row)

    def _parquet_cell(self, row: dict) -> bytes:
        # parquet: offset = row group, size = row in group
        # (discovery refused row groups over --max-read-mb; one row group's column is held as Arrow
        # data and one cell at a time becomes Python bytes, not the whole column: 2x less memory)
        key = (row["path"], row["offset"])
        if self._rg is None or self._rg[:2] != key:
            self._rg = None  # the previous row group is freed before the next is read
            pf = pq.ParquetFile(row["path"])
            col = pf.read_row_group(row["offset"], columns=[row["image_column"]]).column(0).combine_chunks()
            self._rg = (*key, col)
        return parquet_cell_bytes(self._rg[2][row["size"]].as_py())

    def caption(self, row: dict) -> str | None:
        if row["cap_kind"] == "":
            return row["caption"]
        try:
            raw = (
                self._sparse(row["path"], row["cap_offset"], row["cap_size"])
                if row["cap_kind"].startswith("sparse:")
                else self._span(row["path"], row["cap_offset"], row["cap_size"])
            ).decode("utf-8", errors="replace")
            if row["cap_kind"].removeprefix("sparse:") == "txt":
                return raw.strip()
            cap = json.loads(raw).get("caption")
            return None if cap is None else str(cap)
        except (OSError, ValueError, ImageError, AttributeError):
            return None  # a bad caption never fails an image


@dataclass(frozen=True)
class ReadDecode:
    """``map_batches`` function: a plan block (numpy batch) -> a decoded block."""

    cfg: PreprocessConfig

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["idx"])
        s = self.cfg.image_size
        pixels = np.zeros((n, s, s, 3), np.uint8)
        ok = np.zeros(n, bool)
        out: dict[str, list[str | None]] = {k: [None] * n for k in ("stage", "error", "sha256", "caption")}
        width = np.zeros(n, np.int32)
        height = np.zeros(n, np.int32)
        t_read = np.zeros(n)
        t_decode = np.zeros(n)
        reader = _Reader()
        try:
            for i in range(n):
                row = {k: batch[k][i] for k in batch}
                t0 = time.perf_counter()
                stage = "read"
                try:
                    data = reader.image(row)
                    out["sha256"][i] = hashlib.sha256(data).hexdigest()
                    out["caption"][i] = reader.caption(row)
                    t1 = time.perf_counter()
                    t_read[i] = t1 - t0
                    stage = "decode"
                    pixels[i], width[i], height[i] = decode_one(data, self.cfg)
                    ok[i] = True
                except ImageError as e:
                    out["stage"][i], out["error"][i] = e.stage, e.reason
                except Exception as e:  # noqa: BLE001 - one bad image never stops the job
                    out["stage"][i], out["error"][i] = stage, f"{type(e).__name__}: {e}"
                t_decode[i] = time.perf_counter() - t0 - t_read[i]
        finally:
            reader.close()
        return {
            "idx": batch["idx"],
            "ok": ok,
            **{k: np.array(v, dtype=object) for k, v in out.items()},
            "width": width,
            "height": height,
            "pixels": pixels,
            "t_read": t_read,
            "t_decode": t_decode,
        }


@dataclass(frozen=True)
class TokenizerBuilder:
    """What an encode actor needs to build its tokenizer (pickles as a few strings)."""

    path: str
    device: str = "cpu"
    """cpu | cuda: a GPU actor is given one GPU by Ray (``num_gpus=1``) and sees it as cuda:0."""
    threads: int = 0
    """torch intra-op threads for a CPU actor (0: leave torch's default)."""
    encoder_dtype: str = "float32"
    """float32 (features as the reference) | bfloat16 (autocast; faster on GPU, features change)."""
    search_dtype: str | None = None
    """RVQ candidate search of ``encode_pixels`` (None: its default); codes do not depend on it."""
    compile: bool = False
    """torch.compile the tower once per actor, for one batch shape (asvr.tokenizer.encode_engine)."""
    chunks: int = 1
    """> 1: the tower runs the next piece of a batch on a side CUDA stream while the RVQ of the
    current one runs (no-op on CPU)."""

    def build(self):
        import torch

        from asvr.tokenizer.model import SemanticTokenizer

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return SemanticTokenizer.load(self.path, device=self.device)


class Encoder:
    """``map_batches`` callable class: decoded block -> codes; one tokenizer per actor."""

    def __init__(self, builder: TokenizerBuilder):
        import torch

        from asvr.tokenizer.encode_engine import EngineOptions, PixelEncoder

        self.tok = builder.build()  # the weights' hash: once per machine and file state (weights_hash)
        self.dtype = torch.bfloat16 if builder.encoder_dtype == "bfloat16" else None
        self.search_dtype = builder.search_dtype
        self.engine = PixelEncoder(
            self.tok, self.dtype, self.search_dtype, EngineOptions(compile=builder.compile, chunks=builder.chunks)
        )
        e = self.tok.spec.encoder
        self.mean = torch.tensor(e.mean, dtype=torch.float32, device=self.tok.device)
        self.std = torch.tensor(e.std, dtype=torch.float32, device=self.tok.device)
        self.ncodes = self.tok.spec.codes_per_image

    def normalise(self, pixels: np.ndarray):
        """uint8 ``[N, S, S, 3]`` -> float32 ``[N, 3, S, S]``, the same values as ``preprocess``."""
        import torch

        x = torch.from_numpy(pixels).to(self.tok.device, non_blocking=True).float()
        x = x * np.float32(1 / 255)
        x = (x - self.mean) / self.std
        return x.permute(0, 3, 1, 2).contiguous()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        ok = batch["ok"].astype(bool)
        n = len(ok)
        codes = np.zeros((n, self.ncodes), np.uint16)
        if ok.any():
            c = self.engine(self.normalise(np.ascontiguousarray(batch["pixels"][ok])))
            codes[ok] = c.reshape(int(ok.sum()), -1).to("cpu").numpy().astype(np.uint16)
        t_encode = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["codes"] = codes
        out["t_encode"] = t_encode
        return out
