"""The LVLM (asvr.train.model.lvlm): packing, losses, stages, backbones, export.

Tiny random LLMs from configs (llama, qwen2, mistral; hidden 64, 2 layers,
vocab 300); references are independent where one exists (HF's own loss, a
sample run alone, full-logits CE)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from asvr.tokenizer.artifact import load_artifact
from asvr.train.data.batch import Batch
from asvr.train.config import ModelConfig, VisionSpec, VisualHeadConfig, tiny_llm_config
from asvr.core.errors import FingerprintError
from asvr.train.export.native import ExportError, load_exported, save_exported
from asvr.train.model.lvlm import build_model

FAMILIES = ["llama", "qwen2", "mistral"]
GRID, C, DEPTH, K = (2, 3), 16, 3, 20
HW = GRID[0] * GRID[1]
HEAD = dict(proj_hidden=32, width=32, head_dim=8, layers=2)


def tiny_model(family="llama", mode="features", seed=0, vision=None, codebooks=None, **kw):
    torch.manual_seed(seed)
    if vision is None:
        vision = VisionSpec(dim=C, grid=GRID, depth=DEPTH, codebook_size=K)
        codebooks = torch.randn(DEPTH, K, C, generator=torch.Generator().manual_seed(99))
    cfg = ModelConfig(
        llm=tiny_llm_config(family), vision_input=mode, head=VisualHeadConfig(**HEAD), vision=vision, **kw
    )
    return build_model(cfg, codebooks=codebooks)


@dataclass
class Sample:
    ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L]
    image_mask: torch.Tensor  # [L] bool
    codes: torch.Tensor | None  # [H, W, D]


def make_sample(
    seed: int, pre: int, image: bool, post: int, caption: bool = True, grid=GRID, depth=DEPTH, k=K
) -> Sample:
    g = torch.Generator().manual_seed(seed)
    hw = grid[0] * grid[1] if image else 0
    n = pre + hw + post
    ids = torch.randint(3, 300, (n,), generator=g)
    ids[0] = 1  # BOS
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pre : pre + hw] = True
    labels = ids.clone()
    labels[: pre + hw] = -100  # prompt and image carry no text loss
    if not caption:
        labels[:] = -100
    codes = torch.randint(0, k, (*grid, depth), generator=g) if image else None
    return Sample(ids, labels, mask, codes)


def collate(rows: list[list[Sample]], t: int, mode: str, model=None) -> Batch:
    b = len(rows)
    ids = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100)
    pos = torch.zeros(b, t, dtype=torch.long)
    sid = torch.zeros(b, t, dtype=torch.long)
    im = torch.zeros(b, t, dtype=torch.bool)
    codes = []
    for r, row in enumerate(rows):
        at = 0
        for i, s in enumerate(row):
            n = len(s.ids)
            ids[r, at : at + n], labels[r, at : at + n], im[r, at : at + n] = s.ids, s.labels, s.image_mask
            pos[r, at : at + n] = torch.arange(n)
            sid[r, at : at + n] = i + 1
            if s.codes is not None:
                codes.append(s.codes)
            at += n
        assert at <= t
    if not codes:
        return Batch(ids, labels, pos, sid, im)
    codes = torch.stack(codes)
    vision = codes if mode == "codes" else model.vision.quantizer.decode(codes)
    return Batch(ids, labels, pos, sid, im, vision, codes.flatten(1, 2), torch.ones(len(codes), dtype=torch.bool))


def logits_of(model, batch):
    return model.llm.get_output_embeddings()(model.hidden_states(batch))


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_gives_the_logits_of_each_sample_alone(family):
    model = tiny_model(family).eval()
    s1, s2, s3 = make_sample(1, 3, True, 4), make_sample(2, 5, False, 3), make_sample(3, 2, True, 6)
    packed = collate([[s1, s2], [s3]], 24, "features", model)
    assert model.attention_mask(packed.sample_ids, torch.float32) is not None  # the 4D mask path
    with torch.no_grad():
        got = logits_of(model, packed)
        for row, at, s in [(0, 0, s1), (0, len(s1.ids), s2), (1, 0, s3)]:
            alone = collate([[s]], len(s.ids), "features", model)
            assert model.attention_mask(alone.sample_ids, torch.float32) is None  # plain causal path
            want = logits_of(model, alone)[0]
            torch.testing.assert_close(got[row, at : at + len(s.ids)], want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- losses
@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_backward_matches_hf_loss_and_naive_visual_loss(family):
    model = tiny_model(family)
    model.set_stage("sft")
    s = make_sample(5, 3, True, 7)
    batch = collate([[s]], len(s.ids), "features", model)
    loss, m = model.training_forward(batch)
    loss.backward()
    # text: HF's own shifted CE on the same embeddings
    with torch.no_grad():
        hf = model.llm(
            inputs_embeds=model.embed(batch.input_ids, batch.image_mask, batch.vision), labels=batch.labels
        ).loss
        torch.testing.assert_close(m["loss_text"], hf, rtol=1e-5, atol=1e-6)
        # visual: full [N, D, K] logits
        rows = model.hidden_states(batch)[batch.image_mask]
        codes = batch.visual_codes.reshape(-1, DEPTH)
        x = model.head.states(rows, model.vision.code_context(codes))
        per = [F.cross_entropy(c.logits(x[:, d]), codes[:, d]) for d, c in enumerate(model.head.classifiers)]
        for d in range(DEPTH):
            torch.testing.assert_close(m[f"loss_visual_d{d}"], per[d], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m["loss_visual"], torch.stack(per).mean(), rtol=1e-5, atol=1e-6)
    assert int(m["n_text_tokens"]) == int((batch.labels[:, 1:] != -100).sum()) and int(m["n_visual_tokens"]) == HW
    torch.testing.assert_close(m["loss"], m["loss_text"] + m["loss_visual"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.llm.parameters())


def test_no_image_samples_and_masked_images_add_no_visual_loss():
    model = tiny_model("llama")
    s_img, s_txt = make_sample(7, 2, True, 5), make_sample(8, 4, False, 6)
    both = collate([[s_img, s_txt]], 32, "features", model)
    alone = collate([[s_img]], len(s_img.ids), "features", model)
    _, m_both = model.training_forward(both)
    _, m_alone = model.training_forward(alone)
    torch.testing.assert_close(m_both["loss_visual"], m_alone["loss_visual"], rtol=1e-5, atol=1e-6)
    assert int(m_both["n_visual_tokens"]) == int(m_alone["n_visual_tokens"]) == HW
    # a text-only batch, and an image whose visual loss is switched off
    _, m_txt = model.training_forward(collate([[s_txt]], 12, "features", model))
    assert float(m_txt["loss_visual"]) == 0.0 and int(m_txt["n_visual_tokens"]) == 0
    alone.visual_loss_mask = torch.tensor([False])
    model.set_stage("pretrain")
    loss, m_off = model.training_forward(alone)
    assert float(m_off["loss_visual"]) == 0.0 and int(m_off["n_visual_tokens"]) == 0
    torch.testing.assert_close(loss, m_off["loss_text"])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.head.parameters())


def test_grey_image_option_adds_the_originals_dummy_targets_from_zero_states():
    """--text-only-visual-loss grey-image: a text-only sample adds H*W targets (the grey image's
    codes) that the head predicts from zero hidden states, averaged with the real image's."""
    model = tiny_model("llama")
    s_img, s_txt = make_sample(7, 2, True, 5), make_sample(8, 4, False, 6)
    grey = torch.randint(0, K, (1, HW, DEPTH), generator=torch.Generator().manual_seed(3))
    batch = collate([[s_img, s_txt]], 32, "features", model)
    batch.text_only_codes = grey
    _, m = model.training_forward(batch)
    assert int(m["n_visual_tokens"]) == 2 * HW
    with torch.no_grad():  # the naive reference: full logits over [image rows; zero rows]
        rows = model.hidden_states(batch)[batch.image_mask]
        rows = torch.cat([rows, torch.zeros_like(rows)])
        codes = torch.cat([batch.visual_codes.reshape(-1, DEPTH), grey.reshape(-1, DEPTH)])
        x = model.head.states(rows, model.vision.code_context(codes))
        per = [F.cross_entropy(c.logits(x[:, d]), codes[:, d]) for d, c in enumerate(model.head.classifiers)]
    torch.testing.assert_close(m["loss_visual"], torch.stack(per).mean(), rtol=1e-5, atol=1e-6)
    _, m_off = model.training_forward(collate([[s_img, s_txt]], 32, "features", model))
    assert int(m_off["n_visual_tokens"]) == HW and not torch.allclose(m_off["loss_visual"], m["loss_visual"])


def test_caption_free_sample_has_no_text_loss():
    model = tiny_model("qwen2", visual_loss_weight=0.5)
    s = make_sample(9, 1, True, 0, caption=False)
    loss, m = model.training_forward(collate([[s]], len(s.ids), "features", model))
    assert float(m["loss_text"]) == 0.0 and int(m["n_text_tokens"]) == 0
    assert float(m["loss_visual"]) > 0
    torch.testing.assert_close(loss, 0.5 * m["loss_visual"])
    loss.backward()  # the LM head ran on zero rows: graph intact


def test_codes_input_equals_features_of_the_decoded_codes():
    s = make_sample(11, 3, True, 4)
    m_codes = tiny_model("llama", mode="codes", seed=3)
    m_feats = tiny_model("llama", mode="features", seed=3)
    l1, _ = m_codes.training_forward(collate([[s]], len(s.ids), "codes", m_codes))
    l2, _ = m_feats.training_forward(collate([[s]], len(s.ids), "features", m_feats))
    torch.testing.assert_close(l1, l2)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    s1, s2 = make_sample(12, 3, True, 4), make_sample(13, 2, True, 5)
    out = []
    for ckpt in (False, True):
        model = tiny_model("mistral", seed=4, gradient_checkpointing=ckpt).train()
        model.set_stage("sft")
        batch = collate([[s1, s2]], 30, "features", model)
        loss, _ = model.training_forward(batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- stages
def test_pretrain_stage_freezes_the_llm():
    model = tiny_model("llama")
    groups = model.set_stage("pretrain")
    assert [g["name"] for g in groups] == ["projector", "visual_head"]
    before = [p.detach().clone() for p in model.llm.parameters()]
    opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1)
    s = make_sample(14, 2, True, 5)
    loss, _ = model.training_forward(collate([[s]], len(s.ids), "features", model))
    loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert model.projector[0].weight.grad.abs().sum() > 0  # text loss reaches the projector through the frozen LLM
    assert all(p.grad is not None for p in model.head.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.llm.parameters()))
    names = [g["name"] for g in model.set_stage("sft")]
    assert names == ["projector", "visual_head", "llm"] and all(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())


# --------------------------------------------------------------------------- generation
def test_generate_is_greedy_decoding():
    model = tiny_model("llama").eval()
    s = make_sample(15, 3, True, 2)
    b = collate([[s]], len(s.ids), "features", model)
    new = model.generate(b.input_ids, b.image_mask, b.vision, max_new_tokens=5)
    # reference: full forward without cache, argmax, append
    x = model.embed(b.input_ids, b.image_mask, b.vision)
    want = []
    with torch.no_grad():
        for _ in range(new.shape[1]):
            logits = model.llm(inputs_embeds=x).logits[0, -1]
            tok = int(logits.argmax())
            want.append(tok)
            x = torch.cat([x, model.llm.get_input_embeddings()(torch.tensor([[tok]]))], 1)
    assert new[0].tolist() == want and new.shape[1] >= 1


# --------------------------------------------------------------------------- export
def _train_one_step(model, batch):
    model.set_stage("sft")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, _ = model.training_forward(batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def test_export_roundtrip_and_strict_keys(tmp_path, tiny_tokenizer_dir):
    spec, cb = load_artifact(tiny_tokenizer_dir)
    vision = VisionSpec(
        dim=spec.dim,
        grid=spec.grid,
        depth=spec.depth,
        codebook_size=spec.codebook_size,
        fingerprint=spec.fingerprint,
        path=str(tiny_tokenizer_dir),
    )
    model = tiny_model("qwen2", mode="codes", vision=vision, codebooks=cb)  # qwen2 tiny: tied embeddings
    s1 = make_sample(16, 2, True, 4, grid=spec.grid, depth=spec.depth, k=spec.codebook_size)
    s2 = make_sample(17, 3, False, 3)
    batch = collate([[s1, s2]], 70, "codes", model)
    _train_one_step(model, batch)
    out = save_exported(model, tmp_path / "export")
    assert {"asvr_config.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = load_exported(out)  # the tokenizer's codebooks come from the recorded path
    with torch.no_grad():
        _, m1 = model.training_forward(batch)
        _, m2 = loaded.training_forward(batch)
    assert {k: float(v) for k, v in m1.items()} == {k: float(v) for k, v in m2.items()}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    b1 = collate([[s1]], len(s1.ids), "codes", model)
    assert torch.equal(
        model.generate(b1.input_ids, b1.image_mask, b1.vision, max_new_tokens=4),
        loaded.generate(b1.input_ids, b1.image_mask, b1.vision, max_new_tokens=4),
    )

    weights = out / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.startswith("head."))
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(ExportError, match="1 missing keys"):
        load_exported(out)
    save_file({**tensors, "head.extra": torch.zeros(1)}, weights)
    with pytest.raises(ExportError, match="1 unexpected"):
        load_exported(out)


def test_online_vision_input_with_the_real_encoder(tmp_path, tiny_tokenizer):
    from conftest import make_image

    cfg = ModelConfig(llm=tiny_llm_config("llama"), vision_input="online", head=VisualHeadConfig(**HEAD))
    model = build_model(cfg, tiny_tokenizer)
    assert cfg.vision.fingerprint == tiny_tokenizer.spec.fingerprint
    pixels = torch.from_numpy(tiny_tokenizer.preprocess_images([make_image(1)]))
    codes = tiny_tokenizer.encode_pixels(pixels)  # [1, 7, 7, D], the cached targets
    g = tiny_tokenizer.spec.grid
    samples = [
        make_sample(20 + i, 2, True, 3, grid=g, depth=tiny_tokenizer.spec.depth, k=tiny_tokenizer.spec.codebook_size)
        for i in range(1)
    ]
    for s, c in zip(samples, codes):
        s.codes = c
    batch = collate([samples + [make_sample(30, 4, False, 3)]], 64, "codes", model)
    batch.vision = pixels
    model.train()
    assert not model.vision.encoder.training  # the frozen encoder stays in eval mode
    loss, m = model.training_forward(batch)
    loss.backward()
    assert int(m["n_visual_tokens"]) == g[0] * g[1]
    assert all(p.grad is None for p in model.vision.parameters())
    out = save_exported(model, tmp_path / "online")
    assert not any(k.startswith("vision.") for k in load_file(out / "model.safetensors"))
    loaded = load_exported(out, tokenizer=tiny_tokenizer)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.training_forward(batch)[0], loaded.training_forward(batch)[0])
    other = type(tiny_tokenizer.spec)(**{**tiny_tokenizer.spec.__dict__, "fingerprint": "0" * 64})
    tiny_tokenizer_spec = tiny_tokenizer.spec
    try:
        tiny_tokenizer.spec = other
        with pytest.raises(FingerprintError, match="fingerprint mismatch"):
            load_exported(out, tokenizer=tiny_tokenizer)
    finally:
        tiny_tokenizer.spec = tiny_tokenizer_spec
    assert np.isfinite(float(m["loss"]))
