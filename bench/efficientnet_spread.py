"""Mean and covariance of the shipped EfficientNet-Lite0 encoder's features (7x7x320)
on the sample corpus's images, for bench/gpu_rvq_kernel.py: features "with the
spread of a trained encoder" are drawn there as a Gaussian with this covariance,
projected to 1152-d by a random orthonormal map (a random SigLIP tower
concentrates distances; a trained encoder's spectrum is far from flat).

    python bench/efficientnet_spread.py --out .gpu/data/effnet_spread.npz [--images 200]
(~20 s on 2 CPU cores; the file is ~0.4 MB, not committed.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.encoders.base import default_encoder_spec
from asvr.demo.sample_corpus import make_scene


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=200)
    a = p.parse_args(argv)
    tok = SemanticTokenizer.from_parts(default_encoder_spec(), torch.zeros(1, 2, 320))
    imgs = [make_scene(0, i, "train")[1] for i in range(a.images)]
    feats = []
    for s in range(0, len(imgs), 32):
        feats.append(tok.features(tok.preprocess_images(imgs[s : s + 32])).reshape(-1, 320).double())
    x = torch.cat(feats)
    mean = x.mean(0)
    cov = torch.cov(x.T)
    ev = torch.linalg.eigvalsh(cov).flip(0)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mean=mean.numpy(), cov=cov.numpy(), rows=x.shape[0])
    share = (ev[:10].sum() / ev.sum()).item()
    print(f"{x.shape[0]} rows of 320-d; top-10 eigenvalues hold {share:.1%} of the variance -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
