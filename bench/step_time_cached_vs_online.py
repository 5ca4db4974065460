"""Step time: training on cached codes vs running the tokenizer on the images every step.

Same LVLM (a small Llama config + projector + visual head), same batch, one
optimizer step (forward, backward, AdamW) each, measured in the same process:

* ``cached codes``   vision input rebuilt from the cached codes (codebook sum),
                     targets = the cached codes.  No encoder at all.
* ``online+cached``  the frozen encoder on pixels for the vision input (the
                     paper's best setting), targets = the cached codes.
* ``reference``      as the reference does: encoder on pixels for the input,
                     *and* the tokenizer (encoder + residual quantization) on the
                     same pixels again for the targets, every step.

Pixels are decoded and preprocessed once beforehand (decode + resize cost is
printed separately: a data loader pays it per image per epoch in the two
pixel modes, never in the codes mode).  Default sizes run on a laptop CPU with
the embedded EfficientNet-Lite0 tokenizer (7x7 grid); ``--device cuda`` and
larger ``--hidden/--layers`` for a GPU.  ``--siglip`` swaps in a random
SigLIP-so400m-sized tower (27x27 grid, 1152-d, built from a config in a temp
folder) with 8 x 16384 codebooks: the SigLIP-scale ratio of issue 12; on CUDA
the model is built in bf16 on the device and the encoder runs under bf16 autocast.

    python bench/step_time_cached_vs_online.py [--batch 4] [--steps 3] [--device cpu]
    python bench/step_time_cached_vs_online.py --siglip --device cuda --hidden 2048 --layers 24 --text 1318 \\
        --depth 8 --codebook 16384 --search-dtype fused-bf16x3     # one H100/H200
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.encoders.base import default_encoder_spec
from asvr.train.data.batch import Batch
from asvr.train.config import ModelConfig, VisualHeadConfig, tiny_llm_config
from asvr.train.model.lvlm import build_model

try:  # as bench.x (tests) or as python bench/x.py (the script's folder on sys.path)
    from bench._common import siglip_config
except ModuleNotFoundError:
    from _common import siglip_config


def make_images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:480, 0:640] / 640
        arr = np.stack([np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9)) for _ in range(3)], -1)
        buf = io.BytesIO()
        Image.fromarray(((arr * 0.5 + 0.5) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_batch(tok: SemanticTokenizer, pixels: torch.Tensor, codes: torch.Tensor, text: int, vocab: int) -> Batch:
    n = pixels.shape[0]
    hw = tok.spec.tokens_per_image
    T = 1 + hw + text
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, T), generator=g)
    image_mask = torch.zeros(n, T, dtype=torch.bool)
    image_mask[:, 1 : 1 + hw] = True
    labels = ids.masked_fill(image_mask, -100)
    labels[:, : 1 + hw] = -100
    return Batch(
        input_ids=ids,
        labels=labels,
        position_ids=torch.arange(T).expand(n, T).clone(),
        sample_ids=torch.ones(n, T, dtype=torch.long),
        image_mask=image_mask,
        vision=None,
        visual_codes=codes.reshape(n, hw, -1),
        visual_loss_mask=torch.ones(n, dtype=torch.bool),
    )


def timed_steps(model, opt, make, steps: int, device) -> float:
    times = []
    for i in range(steps + 1):  # first step is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        batch = make()
        loss, _ = model.training_forward(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="images (one per sample) per step")
    p.add_argument("--text", type=int, default=64, help="text tokens per sample")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--depth", type=int, default=4, help="RVQ depth")
    p.add_argument("--codebook", type=int, default=1024, help="codes per depth")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--siglip", action="store_true", help="random SigLIP-so400m-sized tower instead of EfficientNet")
    p.add_argument("--search-dtype", default=None, help="RVQ search of the reference's per-step tokenizer")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if a.siglip:
        import tempfile

        from transformers import SiglipVisionModel

        folder = tempfile.mkdtemp(prefix="siglip_")
        vcfg = siglip_config()
        with torch.device(device):
            SiglipVisionModel(vcfg).save_pretrained(folder)
        cb = torch.randn(a.depth, a.codebook, 1152) * 0.05
        tok = SemanticTokenizer.from_parts(default_encoder_spec("siglip", folder), cb).to(device).eval()
    else:
        cb = torch.randn(a.depth, a.codebook, 320) * 0.3
        tok = SemanticTokenizer.from_parts(default_encoder_spec(), cb).to(device).eval()
    enc_dtype = torch.bfloat16 if cuda else None
    images = make_images(a.batch)
    t = time.perf_counter()
    pixels = torch.from_numpy(tok.preprocess_images(images))
    decode_s = (time.perf_counter() - t) / a.batch
    pixels = pixels.to(device)
    codes = tok.encode_pixels(pixels, dtype=enc_dtype, search_dtype=a.search_dtype).cpu()  # what the shards hold
    llm = tiny_llm_config(
        "llama",
        vocab_size=4096,
        hidden_size=a.hidden,
        layers=a.layers,
        heads=max(1, a.hidden // 64),
        kv_heads=max(1, a.hidden // 128),
        intermediate_size=a.hidden * 4,
    )
    head = VisualHeadConfig(proj_hidden=a.hidden * 2, width=a.hidden * 2, layers=3, head_dim=64)
    print(
        f"device {device}; batch {a.batch} images x ({tok.spec.tokens_per_image} image + {a.text} text tokens); "
        f"LLM hidden {a.hidden} x {a.layers} layers; RVQ depth {a.depth} x {a.codebook}; decode+preprocess of a "
        f"640x480 JPEG: {decode_s * 1e3:.1f} ms/image (pixel modes pay it in the loader)"
    )
    results = {}
    runs = (
        ("cached codes", "codes", codes.to(device)),
        ("online+cached", "online", pixels),
        ("reference", "online", pixels),
    )
    for name, mode, vision in runs:
        torch.manual_seed(0)
        mcfg = ModelConfig(llm=llm, vision_input=mode, head=head, dtype="bfloat16" if cuda else "float32")
        with torch.device(device):  # built on the device: seconds instead of minutes for a 1B model
            model = build_model(mcfg, tok).to(device)
        model.set_stage("sft")
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        base = make_batch(tok, pixels.cpu(), codes, a.text, 4096).to(device)

        def make(vision=vision, name=name):
            b = Batch(**{**base.__dict__})
            b.vision = vision
            if name == "reference":  # tokenizer on the images every step for the targets
                b.visual_codes = tok.encode_pixels(pixels, dtype=enc_dtype, search_dtype=a.search_dtype).reshape(
                    b.visual_codes.shape
                )
            return b

        results[name] = timed_steps(model, opt, make, a.steps, device)
        print(f"{name:14} {results[name] * 1e3:9.1f} ms/step")
        del model, opt
    r = results
    print(
        f"reference / cached codes = {r['reference'] / r['cached codes']:.2f}x; "
        f"reference / online+cached = {r['reference'] / r['online+cached']:.2f}x; "
        f"online+cached / cached codes = {r['online+cached'] / r['cached codes']:.2f}x"
    )


if __name__ == "__main__":
    main()
