"""How many codes the ASVR code's bfloat16 distance computation changes, against
our exact codes (docs/FIDELITY.md).

The ASVR code loads the DualToken tokenizer in bfloat16 and quantizes with
RQ-VAE's ``compute_distances``: ``||x||^2 + ||c||^2 - 2 x.c`` (``addmm``) in
bf16, argmin, residual ``-=`` the bf16 codeword, depth after depth.  We
encode exactly (fp32 search + certified fp64 re-rank = the fp64 argmin).
Here both run on the *same fp32 features*, so the count isolates the distance
computation (the bf16 tower changes the features themselves too).

    .venv/bin/python bench/fidelity_bf16_codes.py [--n 300]

1. the imported fixture of tests/test_tokenizer_dualtoken.py (tiny SigLIP
   + 3 x 16 random codebooks, C=32, 4x4 grid), 64 random images;
2. SigLIP-sized synthetic data: C=1152, K=4096, D=4, features near codebook
   entries (the structure of bench/rvq_cpu.py).

Measured on the 2-core dev box (torch 2.13 CPU, ~90 s; the fp64 reference dominates):
  fixture (1024 positions x 3 depths): 114 of 3072 codes changed (3.7%), 76 of 1024 positions
      (7.4%); per depth 1.8%, 3.6%, 5.8%
  synthetic N=300, C=1152, K=4096, D=4: 317 of 1200 codes changed (26.4%), 159 of 300 positions
      (53.0%); per depth 0.0%, 20.0%, 34.7%, 51.0%: the deeper the residual, the smaller it is
      next to ||c||^2 and the less bf16's 8-bit mantissa separates the candidates
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from asvr.tokenizer.rvq.quantizer import rvq_encode_reference


def bf16_rq_codes(x: np.ndarray, books: np.ndarray) -> np.ndarray:
    """RQ-VAE's compute_distances / quantize, in bfloat16 (the ASVR code's dtype)."""
    r = torch.from_numpy(x).to(torch.bfloat16)
    out = []
    for book in books:
        cb = torch.from_numpy(book).to(torch.bfloat16)
        cbt = cb.t()
        dist = torch.addmm(r.pow(2.0).sum(1, keepdim=True) + cbt.pow(2.0).sum(0, keepdim=True), r, cbt, alpha=-2.0)
        code = dist.argmin(-1)
        r = r - cb[code]
        out.append(code.numpy())
    return np.stack(out, -1)


def fixture(n_images: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Features and codebooks of the imported DualToken fixture (same layout as the test's)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.tokenizer.dualtoken import import_dualtoken

    tiny = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    k, d = 16, 3
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**tiny)).eval()
    state = {
        "siglip_model.vision_model." + key.removeprefix("vision_model."): v.clone()
        for key, v in model.state_dict().items()
    }
    g = torch.Generator().manual_seed(1)
    for i in range(d):
        state[f"quantizer_semantic.codebooks.{i}.weight"] = torch.randn(k + 1, 32, generator=g) * (0.5**i)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"state_dict": state}, tmp / "ckpt.pt")
        (tmp / "cfg").mkdir()
        (tmp / "cfg" / "config.json").write_text(
            json.dumps(
                {
                    "rqvaesiglip": {
                        "code_shape": [4, 4, d],
                        "latent_shape": [4, 4, 32],
                        "n_embed": k,
                        "shared_codebook": False,
                    }
                }
            )
        )
        (tmp / "siglip").mkdir()
        SiglipVisionConfig(**tiny).to_json_file(tmp / "siglip" / "config.json")
        import_dualtoken(tmp / "cfg", tmp / "ckpt.pt", tmp / "siglip", tmp / "tok")
        tok = SemanticTokenizer.load(tmp / "tok")
        rng = np.random.default_rng(0)
        pixels = rng.uniform(-1, 1, (n_images, 3, 32, 32)).astype(np.float32)
        feats = tok.features(pixels).reshape(-1, 32).numpy()
        books = tok.quantizer.expanded_codebooks().numpy()
    return feats, books


def synthetic(n: int, d: int = 4, k: int = 4096, c: int = 1152, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cb = np.stack([rng.standard_normal((k, c)) * 0.6**i for i in range(d)]).astype(np.float32)
    x = cb[0][rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, c))
    return x.astype(np.float32), cb


def report(name: str, x: np.ndarray, books: np.ndarray) -> None:
    exact = rvq_encode_reference(x, books)
    bf16 = bf16_rq_codes(x, books)
    diff = exact != bf16
    per = ", ".join(f"{100 * diff[:, i].mean():.1f}%" for i in range(diff.shape[1]))
    print(
        f"{name}: {int(diff.sum())} of {diff.size} codes changed ({100 * diff.mean():.1f}%), "
        f"{int(diff.any(1).sum())} of {len(x)} positions ({100 * diff.any(1).mean():.1f}%); per depth {per}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="synthetic positions (default 300)")
    a = p.parse_args()
    report("fixture", *fixture())
    report(f"synthetic N={a.n} C=1152 K=4096 D=4", *synthetic(a.n))


if __name__ == "__main__":
    main()
