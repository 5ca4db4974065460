"""import-dualtoken on a tiny checkpoint of the published layout: codes of the
imported tokenizer equal codes computed by hand from the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asvr.tokenizer.model import SemanticTokenizer

from asvr.tokenizer.rvq.quantizer import rvq_encode_reference
from asvr.tokenizer.cli import main
from asvr.tokenizer.dualtoken import DualTokenImportError, import_dualtoken
from conftest import make_image

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
K, D = 16, 3


def _vision_model():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()


def _layout(tmp_path, shared=False, nest=True):
    from transformers import SiglipVisionConfig

    model = _vision_model()
    state = {
        "siglip_model.vision_model." + k.removeprefix("vision_model."): v.clone() for k, v in model.state_dict().items()
    }
    g = torch.Generator().manual_seed(1)
    n_books = 1 if shared else D
    books = [torch.randn(K + 1, 32, generator=g) * (0.5**i) for i in range(n_books)]
    for i in range(D if shared else n_books):  # shared: RQ-VAE registers the same module at every depth
        state[f"quantizer_semantic.codebooks.{i}.weight"] = books[0 if shared else i]
    state["quantizer_pixel.codebooks.0.weight"] = torch.zeros(K + 1, 8)
    state["decoder.conv_in.weight"] = torch.zeros(4, 4)
    state["siglip_model.text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 32)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state}, ckpt)
    rq = {"code_shape": [4, 4, D], "latent_shape": [4, 4, 32], "n_embed": K, "shared_codebook": shared}
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(
        json.dumps({"model_type": "x", "vision_tower": {"rqvaesiglip": rq}} if nest else {"rqvaesiglip": rq})
    )
    siglip = tmp_path / "siglip"
    siglip.mkdir()
    SiglipVisionConfig(**TINY).to_json_file(siglip / "config.json")
    return cfg_dir, ckpt, siglip, state, model


def _hand_codes(state, model, images, shared):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    ref = SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()
    own = {k: state["siglip_model.vision_model." + k.removeprefix("vision_model.")] for k in ref.state_dict()}
    ref.load_state_dict(own, strict=True)
    tok_pp = [np.asarray(im.convert("RGB").resize((32, 32), 3), np.float32) / 255 for im in images]
    px = torch.from_numpy((np.stack(tok_pp) - 0.5) / 0.5).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        feats = ref(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    books = np.stack([state[f"quantizer_semantic.codebooks.{0 if shared else i}.weight"][:K].numpy() for i in range(D)])
    return rvq_encode_reference(feats.reshape(-1, 32).numpy(), books).reshape(len(images), 4, 4, D)


@pytest.mark.parametrize("shared", [False, True])
def test_import_codes_equal_hand_computed(tmp_path, shared):
    cfg_dir, ckpt, siglip, state, model = _layout(tmp_path, shared=shared, nest=not shared)
    res = import_dualtoken(cfg_dir, ckpt, siglip, tmp_path / "tok")
    assert res.spec.depth == D and res.spec.codebook_size == K and res.spec.shared_codebook == shared
    assert set(res.skipped) >= {
        "quantizer_pixel",
        "decoder",
        "siglip_model.text_model",
        "siglip_model.vision_model.encoder.layers.2+",
    }
    assert not (tmp_path / "tok" / "encoder" / "model.safetensors").is_symlink()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "tok" / "encoder" / "model.safetensors"))
    assert all(k.startswith("vision_model.") for k in keys) and not any(".layers.2." in k for k in keys)
    tok = SemanticTokenizer.load(tmp_path / "tok")
    images = [make_image(i, (40, 30)) for i in range(3)]
    got = tok.encode_images(images).numpy()
    np.testing.assert_array_equal(got, _hand_codes(state, model, images, shared))


def test_import_refuses_missing_key_wrong_shape_and_grid(tmp_path):
    cfg_dir, ckpt, siglip, state, _ = _layout(tmp_path)
    bad = dict(state)
    bad.pop("siglip_model.vision_model.encoder.layers.1.mlp.fc2.weight")
    torch.save({"state_dict": bad}, tmp_path / "missing.pt")
    with pytest.raises(DualTokenImportError, match="no siglip_model.vision_model.encoder.layers.1.mlp.fc2.weight"):
        import_dualtoken(cfg_dir, tmp_path / "missing.pt", siglip, tmp_path / "t1")
    bad = dict(state)
    bad["quantizer_semantic.codebooks.1.weight"] = torch.zeros(K, 32)  # pad row missing
    torch.save({"state_dict": bad}, tmp_path / "shape.pt")
    with pytest.raises(DualTokenImportError, match="codebooks.1.weight has shape"):
        import_dualtoken(cfg_dir, tmp_path / "shape.pt", siglip, tmp_path / "t2")
    rq = json.loads((cfg_dir / "config.json").read_text())
    rq["vision_tower"]["rqvaesiglip"]["code_shape"] = [5, 5, D]
    rq["vision_tower"]["rqvaesiglip"]["latent_shape"] = [5, 5, 32]
    (cfg_dir / "config.json").write_text(json.dumps(rq))
    with pytest.raises(DualTokenImportError, match="grid 4x4"):
        import_dualtoken(cfg_dir, ckpt, siglip, tmp_path / "t3")


def test_import_cli_one_line_error(tmp_path, capsys):
    cfg_dir, ckpt, siglip, state, _ = _layout(tmp_path)
    bad = {k: v for k, v in state.items() if not k.startswith("quantizer_semantic.codebooks.0")}
    torch.save({"state_dict": bad}, tmp_path / "bad.pt")
    rc = main(
        [
            "import-dualtoken",
            "--config",
            str(cfg_dir),
            "--checkpoint",
            str(tmp_path / "bad.pt"),
            "--siglip",
            str(siglip),
            "--out",
            str(tmp_path / "tok"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "quantizer_semantic.codebooks.0.weight" in err[0]
    assert (
        main(
            [
                "import-dualtoken",
                "--config",
                str(cfg_dir),
                "--checkpoint",
                str(ckpt),
                "--siglip",
                str(siglip),
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
