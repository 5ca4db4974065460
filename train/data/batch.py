"""The training batch: the one object that crosses from the data side
(templates, packing, loader) to the model side (``ASVRModel.training_forward``).

Rows may be *packed*: several samples share one row of ``T`` tokens.  The
model never attends across samples: ``sample_ids`` numbers the samples of a
row ``1..n`` (``0`` is padding) and ``position_ids`` restart at 0 for each
sample.  Images fill the ``image_mask`` positions in row-major order (row 0
first, left to right); each image takes exactly ``H*W`` consecutive positions,
and ``vision`` / ``visual_codes`` / ``visual_loss_mask`` list the images in
that same order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from asvr.train.data.templates import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor
    """int64 ``[B, T]``; positions where image features go hold pad/any id."""
    labels: torch.Tensor
    """int64 ``[B, T]``; -100 = no text loss (image positions, user turns, padding)."""
    position_ids: torch.Tensor
    """int64 ``[B, T]``; restart at 0 for each packed sample."""
    sample_ids: torch.Tensor
    """int64 ``[B, T]``; 1..n per packed sample in the row, 0 = padding. Attention
    only within the same sample id (causal)."""
    image_mask: torch.Tensor
    """bool ``[B, T]``; True where a vision token goes (row-major order of images)."""
    vision: torch.Tensor | None = None
    """Per image, in image order: pixels ``[N,3,S,S]`` (online), features
    ``[N,H,W,C]`` float (features) or codes ``[N,H,W,D]`` long (codes)."""
    visual_codes: torch.Tensor | None = None
    """int64 ``[N, H*W, D]`` visual targets (from the cached shards)."""
    visual_loss_mask: torch.Tensor | None = None
    """bool ``[N]``; False = no visual loss for that image."""
    text_only_codes: torch.Tensor | None = None
    """int64 ``[M, H*W, D]``: ``--text-only-visual-loss grey-image`` (the ASVR code's behaviour): one grey
    image's codes per text-only sample, predicted by the head from all-zero hidden states."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**kw)

    def pin_memory(self) -> "Batch":
        """A copy in page-locked host memory (``to(cuda, non_blocking=True)`` then does not block)."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return Batch(**kw)

    @property
    def num_images(self) -> int:
        """Number of images in the batch (``vision`` / ``visual_codes`` rows)."""
        if self.vision is not None:
            return int(self.vision.shape[0])
        if self.visual_codes is not None:
            return int(self.visual_codes.shape[0])
        return 0

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (``sample_ids > 0``)."""
        return int((self.sample_ids > 0).sum())


def blank_rows(b: int, width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """The ``[b, width]`` arrays a micro-batch is filled into: ids (``pad_id``), labels (ignored),
    positions, sample ids and the image mask (zeros)."""
    return (
        np.full((b, width), pad_id, np.int64),
        np.full((b, width), IGNORE_INDEX, np.int64),
        np.zeros((b, width), np.int64),
        np.zeros((b, width), np.int64),
        np.zeros((b, width), bool),
    )


def rows_to_batch(
    ids: np.ndarray,
    labels: np.ndarray,
    pos: np.ndarray,
    sid: np.ndarray,
    img: np.ndarray,
    *,
    vision: torch.Tensor | None,
    codes: torch.Tensor | None,
    grey_codes: np.ndarray | None,
    n_text_only: int,
) -> Batch:
    """The ``[rows, len]`` arrays of a micro-batch and its images' model input / target codes
    (None: no image) -> a :class:`Batch`; each of the ``n_text_only`` samples without an image
    gets ``grey_codes`` (the grey image's codes), when given.  One constructor for the in-memory
    collator and the packed stream."""
    grey = None
    if grey_codes is not None and n_text_only:
        grey = torch.from_numpy(np.repeat(grey_codes[None].astype(np.int64), n_text_only, axis=0))
    return Batch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(pos),
        sample_ids=torch.from_numpy(sid),
        image_mask=torch.from_numpy(img),
        vision=vision,
        visual_codes=codes,
        visual_loss_mask=torch.ones(len(codes), dtype=torch.bool) if codes is not None else None,
        text_only_codes=grey,
    )
