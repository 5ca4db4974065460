"""``asvr-export RUN --hf-llava OUT``: the folder transformers loads as a LLaVA gives the
same prompts, pixels, logits and greedy answers as ``asvr-eval`` on ``RUN/final``.

Tiny models built here: a 3-layer SigLIP tower (4x4 grid, feature layer -2), a
tokenizer artifact over it (``square`` and ``pad``), a byte-level-BPE Llama, an
``online`` ASVR model with random weights saved as a run folder.  The reference
is this project's own inference path (``load_for_eval`` + ``encode_prompt`` +
``VisionEncoder`` + ``ASVRModel``); the other side is plain transformers
(``LlavaForConditionalGeneration`` + ``AutoProcessor``), which knows nothing of
ASVR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asvr.tokenizer.artifact import TokenizerSpec, save_artifact

from asvr.tokenizer.encoders.base import default_encoder_spec
from asvr.train.config import ModelConfig, VisualHeadConfig
from asvr.train.export.native import save_exported
from asvr.train.model.lvlm import build_model

TINY_SIGLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
HEAD = VisualHeadConfig(width=64, proj_hidden=64, layers=1, head_dim=32)
QUESTIONS = ["What colour is the square?", "Is there a circle in the picture?\nAnswer yes or no."]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    from asvr.demo.tiny_llm import make_tiny_llm

    root = tmp_path_factory.mktemp("hfexport")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).save_pretrained(root / "siglip")
    CLIPVisionModel(CLIPVisionConfig(**TINY_SIGLIP)).save_pretrained(root / "clip")
    # the LLM's own towers (--vision-tower), other weights and width than the tokenizer's SigLIP
    SiglipVisionModel(SiglipVisionConfig(**{**TINY_SIGLIP, "hidden_size": 48})).save_pretrained(root / "tower")
    CLIPVisionModel(CLIPVisionConfig(**{**TINY_SIGLIP, "hidden_size": 48})).save_pretrained(root / "clip_tower")
    llm = make_tiny_llm(root / "llm", "llama", QUESTIONS + ["red green blue yes no"], vocab_size=300)
    images = []
    for i, size in enumerate([(40, 24), (20, 36)]):  # not square: pad and square differ
        p = root / f"img{i}.png"
        _image(i, size).save(p)
        images.append(p)
    runs = {}
    for mode in ("square", "pad", "clip", "tower", "cls_patch"):
        tok_dir = root / f"tok_{mode}"
        g = torch.Generator().manual_seed(1)
        kind = "clip" if mode == "clip" else "siglip"
        spec = TokenizerSpec(
            encoder=default_encoder_spec(kind, str(root / kind)),
            preprocess="pad" if mode == "pad" else "square",
            grid=(4, 4),
            dim=32,
            depth=2,
            codebook_size=16,
            shared_codebook=False,
        )
        save_artifact(tok_dir, spec, torch.randn(2, 16, 32, generator=g))
        from asvr.tokenizer.model import SemanticTokenizer

        tok = SemanticTokenizer.load(tok_dir)
        torch.manual_seed(2)
        tower = None
        if mode in ("tower", "cls_patch"):
            from asvr.train.model.vision_tower import open_vision_tower

            tower = open_vision_tower(
                root / ("tower" if mode == "tower" else "clip_tower"),
                select="cls_patch" if mode == "cls_patch" else "patch",
            )
        model = build_model(
            ModelConfig(
                llm=str(llm), vision_input="online", head=HEAD, vision_tower=tower.spec if tower is not None else None
            ),
            tok,
            tower=tower,
        )
        with torch.no_grad():  # larger projector weights: images must move the logits
            for p in model.projector.parameters():
                p.mul_(4.0)
        run = root / f"run_{mode}"
        save_exported(model, run / "final", AutoTokenizer.from_pretrained(llm))
        (run / "train_config.json").write_text(json.dumps({"template": "vicuna_v1", "stage": "sft"}))
        runs[mode] = run
    return root, runs, images


def _export(world, mode: str) -> Path:
    """A fresh export of ``mode``'s run; ``square`` is written in 20 KB shards (sharded layout).

    Never shared between tests (~0.3 s an export): every test that checks an export runs the
    export code itself, so mutation testing maps each test to the code it checks (a cached
    export is covered only by the first test that made it, issue 24)."""
    from asvr.train.export.cli import main

    root, runs, _ = world
    out = root / f"hf_{mode}_{len(list(root.glob(f'hf_{mode}_*')))}"
    shards = ["--max-shard-size", "20KB"] if mode == "square" else []
    assert main([str(runs[mode]), "--hf-llava", str(out), *shards]) == 0
    return out


def _ours(run: Path, image: Path, question: str):
    """(input_ids [L], image_mask [L], pixels [3,S,S], logits [L, V]) by this project's inference path."""
    from asvr.eval.formats.base import BenchItem
    from asvr.eval.generate import VisionEncoder, encode_prompt
    from asvr.eval.loading import load_for_eval

    lm = load_for_eval(run, device="cpu")
    ids, mask = encode_prompt(lm, question, True)
    item = BenchItem(
        id="q",
        question=question,
        kind="short",
        answer=None,
        raw_answer=None,
        image=str(image),
        image_key=str(image),
        source="test",
    )
    pixels = VisionEncoder(lm)([item])
    ids_t, mask_t = torch.from_numpy(ids)[None], torch.from_numpy(mask)[None]
    with torch.no_grad():
        x = lm.model.embed(ids_t, mask_t, pixels)
        logits = lm.model.llm(inputs_embeds=x).logits[0]
    return lm, ids, mask, pixels[0], logits


def _theirs(out: Path, image: Path, question: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    return processor, model, inputs


@pytest.mark.parametrize("mode", ["square", "pad", "clip", "tower", "cls_patch"])
def test_hf_llava_matches_asvr_inference(world, mode):
    root, runs, images = world
    out = _export(world, mode)
    for image, question in zip(images, QUESTIONS):
        lm, ids, mask, pixels, logits = _ours(runs[mode], image, question)
        processor, model, inputs = _theirs(out, image, question)
        image_id = model.config.image_token_id
        # the same token stream: the chat template + image expansion give our prompt
        want = np.where(mask, image_id, ids)
        # the same pixels (LLaVA's pad-to-square / plain resize, then normalise)
        torch.testing.assert_close(inputs["pixel_values"][0].float(), pixels.float(), rtol=0, atol=1e-5)
        # the same model: our ids (image positions -> <image>) through transformers' LLaVA
        with torch.no_grad():
            theirs = model(input_ids=torch.from_numpy(want)[None], pixel_values=inputs["pixel_values"]).logits[0]
        vocab = logits.shape[-1]
        torch.testing.assert_close(theirs[:, :vocab], logits, rtol=1e-4, atol=1e-4)
        # the same prompt: the processor's chat template + image expansion give our token stream
        assert inputs["input_ids"][0].tolist() == want.tolist()
        assert (logits.max(-1).values - logits.min(-1).values).min() > 0  # not a constant model
        # images matter: another image changes the logits at the answer position
        other = processor(
            images=Image.open(images[1 - images.index(image)]),
            text=processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
            ),
            return_tensors="pt",
        )
        with torch.no_grad():
            moved = (model(**other).logits[0, -1] - theirs[-1]).abs().max()
        assert moved > 1e-3


def test_greedy_answers_equal_asvr_eval(world):
    from asvr.eval.formats.base import BenchItem
    from asvr.eval.generate import GenerationConfig, generate_answers
    from asvr.eval.loading import load_for_eval

    root, runs, images = world
    out = _export(world, "pad")
    lm = load_for_eval(runs["pad"], device="cpu")
    items = [
        BenchItem(
            id=f"q{i}",
            question=q,
            kind="short",
            answer=None,
            raw_answer=None,
            image=str(im),
            image_key=str(im),
            source="test",
        )
        for i, (im, q) in enumerate(zip(images, QUESTIONS))
    ]
    ours = generate_answers(lm, items, GenerationConfig(max_new_tokens=6, instructions="none", progress=False))
    for item, want in zip(items, ours):
        processor, model, inputs = _theirs(out, Path(item.image), item.question)
        new = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        stop = [t for t in (lm.text_tokenizer.eos_token_id,) if t is not None]
        cut = [i for i, t in enumerate(new.tolist()) if t in stop]
        text = processor.tokenizer.decode(new[: cut[0]] if cut else new, skip_special_tokens=True).strip()
        assert text == want
    assert any(ours)  # the models said something


def test_export_layout_and_visual_head_beside(world):
    from safetensors.torch import load_file

    from asvr.train.export.native import load_exported

    root, runs, _ = world
    out = _export(world, "square")
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert cfg["model_type"] == "llava" and cfg["vision_feature_layer"] == -1
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["vision_config"]["num_hidden_layers"] == 2
    keys = [k for f in out.glob("*.safetensors") for k in load_file(f)]
    assert keys and not any(k.startswith("head.") or "classifiers" in k for k in keys)
    head = load_file(out / "asvr_visual_head" / "model.safetensors")
    from asvr.tokenizer.model import SemanticTokenizer

    model = load_exported(runs["square"] / "final", tokenizer=SemanticTokenizer.load(root / "tok_square"))
    want = model.head.state_dict()
    assert set(head) == set(want)
    for k in want:
        torch.testing.assert_close(head[k], want[k])


def test_refusals_are_one_line(world, tmp_path, capsys, tiny_tokenizer):
    from transformers import AutoTokenizer

    from asvr.train.export.cli import main

    root, runs, _ = world
    # codes mode: no pixels path
    llm = root / "llm"
    model = build_model(ModelConfig(llm=str(llm), vision_input="codes", head=HEAD), tiny_tokenizer)
    save_exported(model, tmp_path / "codes_run" / "final", AutoTokenizer.from_pretrained(llm))
    capsys.readouterr()
    assert main([str(tmp_path / "codes_run"), "--hf-llava", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vision-input codes" in err[0]
    # the embedded EfficientNet tower: not a Hugging Face tower
    model = build_model(ModelConfig(llm=str(llm), vision_input="features", head=HEAD), tiny_tokenizer)
    save_exported(model, tmp_path / "eff_run" / "final", AutoTokenizer.from_pretrained(llm))
    capsys.readouterr()
    assert main([str(tmp_path / "eff_run"), "--hf-llava", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "efficientnet_lite0" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_asvr_eval_bench_scores_an_hf_llava_folder(world, tmp_path):
    """``asvr-eval bench --model OUT`` on the export gives the predictions of ``--model RUN``."""
    from asvr.eval.cli import main

    root, runs, images = world
    out = _export(world, "pad")
    rows = [
        {"id": "a", "image": images[0].name, "question": "Is there a red shape?", "answer": "yes"},
        {"id": "b", "image": images[1].name, "question": "What colour?", "options": ["red", "green"], "answer": "A"},
        {"id": "c", "question": "Say something.", "answer": "x", "type": "short"},
    ]
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = {}
    for name, model in (("run", runs["pad"]), ("hf", out)):
        assert (
            main(
                [
                    "bench",
                    "--model",
                    str(model),
                    "--bench",
                    str(bench),
                    "--images",
                    str(root),
                    "--max-new-tokens",
                    "5",
                    "--batch-size",
                    "1",
                    "--out",
                    str(tmp_path / name),
                    "--quiet",
                ]
            )
            == 0
        )
        preds[name] = [json.loads(l) for l in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        rep = json.loads((tmp_path / name / "report.json").read_text())
        assert rep["config"]["preprocess_mode"] == "pad"
    assert rep["model"]["vision_input"] == "hf-llava"
    assert [p["prediction"] for p in preds["hf"]] == [p["prediction"] for p in preds["run"]]
    assert [p["correct"] for p in preds["hf"]] == [p["correct"] for p in preds["run"]]


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "plain"])
def test_chat_template_renders_the_training_prompt(world, name):
    """The exported Jinja equals ``render(..., generation=True)``: one- and multi-turn, image and text-only."""
    from transformers import AutoTokenizer

    from asvr.train.export.hf_llava import chat_template
    from asvr.train.data.templates import get_template, render, validate_turns

    root, _, _ = world
    tok = AutoTokenizer.from_pretrained(root / "llm")
    t = get_template(name)
    cases = [[("user", "<image>\nWhat is it?")], [("user", "What is it? <image>")]]
    if name != "plain":
        cases += [
            [("user", "Hello there.")],
            [("user", "<image>\nWhat is it?"), ("assistant", "A cat."), ("user", "And the colour?")],
        ]
    for turns in cases:
        conv = [{"from": "human" if r == "user" else "gpt", "value": v} for r, v in turns + [("assistant", "x")]]
        want, _ = render(t, validate_turns(conv, True)[:-1], tok, generation=True)
        messages = []
        for role, text in turns:
            content = [{"type": "text", "text": text.replace("<image>", "").strip()}]
            if "<image>" in text:
                content.insert(0, {"type": "image"})
            messages.append({"role": role, "content": content if role == "user" else text})
        got = tok.apply_chat_template(
            messages, chat_template=chat_template(t), add_generation_prompt=True, tokenize=False
        )
        assert got == want, (name, turns)


def test_the_exported_tower_is_the_llms_not_the_tokenizers(world):
    """With --vision-tower the LLaVA's vision tower is that tower (48-d), not the tokenizer's 32-d SigLIP."""
    from safetensors.torch import load_file
    from transformers import SiglipVisionModel

    root, _, _ = world
    out = _export(world, "tower")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["hidden_size"] == 48
    stored = {
        k.removeprefix("model.vision_tower."): v
        for f in out.glob("*.safetensors")
        for k, v in load_file(f).items()
        if k.startswith("model.vision_tower.")
    }
    src = SiglipVisionModel.from_pretrained(root / "tower").state_dict()
    for k, v in stored.items():
        torch.testing.assert_close(v, src[k])
    clip = json.loads((_export(world, "cls_patch") / "config.json").read_text())
    assert clip["vision_feature_select_strategy"] == "full" and clip["image_seq_length"] == 17


def test_out_is_never_destroyed_and_files_keep_the_umask(world, tmp_path, capsys):
    """A file, a folder of other things or the run folder itself as OUT: refused before any work,
    nothing touched; an earlier export: refused without --overwrite, replaced with it, unless it
    also holds a file the export does not write.  Exported files get 0666 minus the umask."""
    from asvr.train.export.cli import main

    root, runs, _ = world
    run = runs["pad"]
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("mine too")
    for out, why in (
        (plain, f"--hf-llava {plain} is a file, not a folder; give a new or empty folder"),
        (other, f"--hf-llava {other} holds files that are not a LLaVA export (like a.txt); give a new or empty folder"),
        (run, f"--hf-llava {run} holds files that are not a LLaVA export (like final); give a new or empty folder"),
    ):
        for extra in ([], ["--overwrite"]):
            assert main([str(run), "--hf-llava", str(out), *extra]) == 2
            assert capsys.readouterr().err == f"asvr-export --hf-llava: error: {why}\n"
    assert plain.read_text() == "mine" and [p.name for p in other.iterdir()] == ["a.txt"]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before

    out = tmp_path / "empty"
    out.mkdir()
    old = os.umask(0o027)
    try:
        assert main([str(run), "--hf-llava", str(out)]) == 0
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()} == {oct(0o640)}
    assert oct((run / "final" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~old)
    capsys.readouterr()
    assert main([str(run), "--hf-llava", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"asvr-export --hf-llava: error: --hf-llava {out} holds an earlier LLaVA export; --overwrite replaces it\n"
    )
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "marker": 1}))
    assert main([str(run), "--hf-llava", str(out), "--overwrite"]) == 0
    assert "marker" not in json.loads((out / "config.json").read_text())  # replaced by a fresh export
    (out / "README.md").write_text("my notes")
    capsys.readouterr()
    assert main([str(run), "--hf-llava", str(out), "--overwrite"]) == 2  # found once the new files are known
    assert capsys.readouterr().err.splitlines()[-1] == (  # (above it: transformers' "Writing model shards" bar)
        f"asvr-export --hf-llava: error: --hf-llava {out}: the earlier export there also holds README.md, which "
        "this export does not write; move them away first (nothing was replaced)"
    )
    assert (out / "README.md").read_text() == "my notes" and not list(tmp_path.glob(".empty.tmp-*"))


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu"])
def test_a_projector_llava_cannot_hold_is_refused_in_one_line(world, tmp_path, capsys, projector):
    """LLaVA's ``multi_modal_projector`` is Linear-GELU-Linear: any other projector is refused, and
    nothing is written (a silent export would drop or misplace the projector's layers)."""
    from transformers import AutoTokenizer

    from asvr.tokenizer.model import SemanticTokenizer
    from asvr.train.export.cli import main

    root, _, _ = world
    tok = SemanticTokenizer.load(root / "tok_square")
    model = build_model(ModelConfig(llm=str(root / "llm"), vision_input="online", head=HEAD, projector=projector), tok)
    run = tmp_path / f"run_{projector}"
    save_exported(model, run / "final", AutoTokenizer.from_pretrained(root / "llm"))
    (run / "train_config.json").write_text(json.dumps({"template": "vicuna_v1", "stage": "sft"}))
    capsys.readouterr()
    assert main([str(run), "--hf-llava", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"asvr-export --hf-llava: error: the projector is {projector}; LLaVA holds mlp2x_gelu only"], err
    assert not (tmp_path / "out").exists()


def test_the_added_vocabulary_rows_are_never_generated(world):
    """The export grows the vocabulary to hold ``<image>`` (rounded up to a multiple of 64): the new
    rows are zeros, so their logit is 0 and could win; the generation config suppresses exactly them.
    Checked by pushing the added rows' logits far above the rest: with the exported config no
    added id is generated, without the suppression only added ids are."""
    from transformers import AutoTokenizer, GenerationConfig

    from asvr.train.export.hf_llava import VOCAB_MULTIPLE

    root, runs, images = world
    out = _export(world, "pad")
    old = len(AutoTokenizer.from_pretrained(root / "llm"))
    processor, model, inputs = _theirs(out, images[0], QUESTIONS[0])
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab % VOCAB_MULTIPLE == 0 and vocab > old
    gen = GenerationConfig.from_pretrained(out)
    assert gen.suppress_tokens == list(range(old, vocab))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") in gen.suppress_tokens

    def push_added(_module, _inputs, logits):
        logits[..., old:] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(push_added)
    try:
        n = inputs["input_ids"].shape[1]
        gen.max_new_tokens, gen.do_sample = 4, False
        kept = model.generate(**inputs, generation_config=gen)[0, n:]
        gen.suppress_tokens = model.generation_config.suppress_tokens = None  # generate merges the model's
        free = model.generate(**inputs, generation_config=gen)[0, n:]
    finally:
        hook.remove()
    assert kept.numel() and all(t < old for t in kept.tolist()), kept
    assert free.numel() and all(t >= old for t in free.tolist()), free
