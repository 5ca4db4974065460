"""Can the demo's from-scratch LLM learn to answer when the answer is *written in its prompt*?

``python -m bench.llm_lookup_probe --task caption|pointing [--seconds 300] [--layers 2] [--out FILE]``

The control experiment for the ASVR miniature (``bench/asvr_effect.py``, ``make demo``).  There
the model's yes/no and multiple-choice answers stay at chance; this probe removes the image.
A tiny Llama of the demo's size (``tiny_llm_config``: hidden 128, 2 layers, 4 heads; the
demo's BPE tokenizer trained on the same texts) is trained from scratch with a plain PyTorch
loop (AdamW, batch 32, loss on the answer only) on text where the answer needs no image:

* ``caption``: the scene's description, then one of the corpus's questions
  (``asvr.demo.vqa_corpus``: 5 categories x yes/no, multiple choice, short answer),
  the LLaVA-1.5 answer-format instruction and the answer.  Every answer can be looked up in
  the description ("A small red circle at the top left, ...  Is the circle blue?").
* ``pointing``: only the last step of a multiple-choice answer: four options, "Which option is
  X?", the letter.

Held-out items are new scenes (new option sets); each item is scored by the log-likelihood
of every admissible answer (yes/no, the letters, the category's words), so tokenisation
cannot leak or hide an answer.  Chance is 1/2, 1/options and 1/vocabulary.

Measured on this machine's 2 cores (2026-11-26, one thread per run; curves in
``bench/results/llm_lookup_probe/``): with the demo's chat layout, the caption task's yes/no
stays at chance for 4500 steps (1230 s; 144k examples, 12x every answer the demo's SFT sees)
and multiple choice only starts to move at ~4000 steps; a 4-layer 256-d model is no faster per
second.  The bare pointing step stays at chance for 3500 steps (2 layers; lr 3e-3 too; 4
layers for 2500).  The sanity check: the same pointing items with the question moved after the
options and without the system prompt (``--task pointing-last --no-system``) take off after
~2500 steps and reach 87 % at 6500 (366 s), so the loop and the scoring can learn; in the
demo's layout (system prompt and USER turn, the question before the options, the instruction
after them) the same look-up is far slower to learn (which of the two changes matters was not
separated).

What it says: the demo's failure on yes/no and multiple choice is not the image path or the
visual loss.  A from-scratch LLM of this size, given the answer in plain text, needs far more
updates to learn in-context look-up than the demo's 10 CPU minutes allow; the published recipe
starts from a pretrained LLM (Vicuna), which has these skills before it sees an image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("caption", "pointing", "pointing-last")


@dataclass
class Item:
    prompt: str
    candidates: list[str]
    gold: int
    form: str


@dataclass
class ProbeResult:
    task: str
    layers: int
    hidden: int
    system: bool
    batch: int
    lr: float
    seconds: float
    curve: list[dict] = field(default_factory=list)
    """[{step, seconds, accuracy per form}] every ``--eval-every`` steps."""
    chance: dict[str, float] = field(default_factory=dict)


def _caption_item(rng: np.random.Generator, index: int, split: str) -> Item:
    from asvr.demo import vqa_corpus as vc

    scene = vc.make_scene(1, split, index, vc.heldout_pairs(1))
    cat, form = vc.CATEGORIES[int(rng.integers(5))], vc.FORMS[int(rng.integers(3))]
    held = split == "heldout"  # held-out: yes/no truths and right letters balanced by index
    q = vc._ask(cat, form, scene, rng, truth=index % 2 == 0 if held else bool(rng.integers(2)))
    if form == "yes_no":
        cands, gold = ["Yes", "No"], 0 if q.answer == "yes" else 1
    elif form == "multiple_choice":
        assert q.options is not None
        q.options, letter = vc._place_options(q, index // 2 if held else int(rng.integers(len(q.options))))
        cands = list("ABCD"[: len(q.options)])
        gold = cands.index(letter)
    else:
        vocab = {
            "colour": list(vc.COLOURS),
            "shape": list(vc.SHAPES),
            "count": list(vc.COUNTS),
            "size": list(vc.SIZES),
            "position": list(vc.RELATIONS),
        }[cat]
        cands, gold = [w[0].upper() + w[1:] for w in vocab], vocab.index(q.answer)
    return Item(scene.caption + "\n" + vc.prompt(q), cands, gold, form)


def _pointing_item(rng: np.random.Generator, index: int, split: str) -> Item:
    from asvr.demo import vqa_corpus as vc

    words = list(vc.COLOURS) + list(vc.SHAPES) + list(vc.SIZES) + list(vc.RELATIONS)
    picked = [words[int(k)] for k in rng.permutation(len(words))[:4]]
    j = index % 4 if split == "heldout" else int(rng.integers(4))
    lines = [f"{'ABCD'[k]}. {w}" for k, w in enumerate(picked)]
    prompt = "\n".join([f"Which option is {picked[j]}?", *lines, vc.INSTRUCTION["multiple_choice"]])
    return Item(prompt, list("ABCD"), j, "multiple_choice")


def _pointing_last_item(rng: np.random.Generator, index: int, split: str) -> Item:
    """The sanity check: the same items with the question moved next to the answer (options
    first, no instruction), a short-range look-up a 2-layer model does learn."""
    it = _pointing_item(rng, index, split)
    question, *rest = it.prompt.split("\n")
    return Item("\n".join([*rest[:-1], question]), it.candidates, it.gold, it.form)


MAKERS = {"caption": _caption_item, "pointing": _pointing_item, "pointing-last": _pointing_last_item}


def _chat(prompt: str, system: bool = True) -> str:
    """The demo's conversation layout (vicuna_v1) of one question, up to the answer; without
    ``system``: the bare prompt and "ASSISTANT:"."""
    from asvr.train.data.templates import VICUNA_V1_SYSTEM

    if not system:
        return f"{prompt} ASSISTANT:"
    return f"{VICUNA_V1_SYSTEM} USER: {prompt} ASSISTANT:"


def _encode(tok, item: Item, cand: int, system: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + " answer</s>" and where the answer starts."""
    head = tok(_chat(item.prompt, system))["input_ids"]
    full = tok(_chat(item.prompt, system) + " " + item.candidates[cand])["input_ids"] + [tok.eos_token_id]
    start = len(head)
    while start > 0 and full[:start] != head[:start]:
        start -= 1
    return full, start


def _batch(seqs: list[tuple[list[int], int]]):
    import torch

    n = max(len(s) for s, _ in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for r, (s, start) in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        labels[r, start : len(s)] = torch.tensor(s[start:])
        mask[r, : len(s)] = 1
    return ids, labels, mask


def _score(model, tok, items: list[Item], system: bool = True) -> dict[str, float]:
    """Accuracy per form: the candidate with the highest summed answer log-likelihood."""
    import torch

    seqs = [(_encode(tok, it, c, system), i, c) for i, it in enumerate(items) for c in range(len(it.candidates))]
    ll = np.zeros(len(seqs))
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(seqs), 64):
            chunk = seqs[lo : lo + 64]
            ids, labels, mask = _batch([s for s, _, _ in chunk])
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
            tgt = labels[:, 1:]
            got = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * (tgt >= 0)
            ll[lo : lo + len(chunk)] = got.sum(-1).numpy()
    model.train()
    best: dict[int, tuple[float, int]] = {}
    for (_, i, c), v in zip(seqs, ll):
        if i not in best or v > best[i][0]:
            best[i] = (float(v), c)
    acc: dict[str, list[bool]] = {}
    for i, it in enumerate(items):
        acc.setdefault(it.form, []).append(best[i][1] == it.gold)
    return {f: float(np.mean(v)) for f, v in sorted(acc.items())}


def run_probe(
    task: str,
    tokenizer_dir: str,
    seconds: float = 300.0,
    layers: int = 2,
    hidden: int = 128,
    batch: int = 32,
    lr: float = 1e-3,
    eval_every: int = 250,
    heldout: int = 300,
    seed: int = 0,
    threads: int = 1,
    system: bool = True,
) -> ProbeResult:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(task, tokenizer_dir, seconds, layers, hidden, batch, lr, eval_every, heldout, seed, system)
    finally:
        torch.set_num_threads(before)  # a caller's (or a test session's) thread count is not ours to keep


def _train(
    task: str,
    tokenizer_dir: str,
    seconds: float,
    layers: int,
    hidden: int,
    batch: int,
    lr: float,
    eval_every: int,
    heldout: int,
    seed: int,
    system: bool,
) -> ProbeResult:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from asvr.train.config import tiny_llm_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    make = MAKERS[task]
    test = [make(np.random.default_rng([seed, 1, i]), i, "heldout") for i in range(heldout)]
    cfg = tiny_llm_config("llama", vocab_size=len(tok), hidden_size=hidden, layers=layers, intermediate_size=2 * hidden)
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    res = ProbeResult(task, layers, hidden, system, batch, lr, seconds)
    forms = {it.form for it in test}
    res.chance = {f: float(np.mean([1 / len(it.candidates) for it in test if it.form == f])) for f in sorted(forms)}
    rng = np.random.default_rng([seed, 0])
    t0, step, i = time.time(), 0, 0
    while True:
        if step % eval_every == 0:
            res.curve.append({"step": step, "seconds": round(time.time() - t0, 1), **_score(model, tok, test, system)})
            print(json.dumps(res.curve[-1]), flush=True)
            if time.time() - t0 >= seconds:
                break
        items = [make(rng, i + k, "train") for k in range(batch)]
        i += batch
        ids, labels, mask = _batch([_encode(tok, it, it.gold, system) for it in items])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--tokenizer", required=True, help="the demo's LLM folder (its BPE tokenizer), e.g. demo_out/llm")
    p.add_argument("--seconds", type=float, default=300.0, help="training wall time (default 300)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-system", dest="system", action="store_false", help="no vicuna system prompt / USER: turn")
    p.add_argument("--out", help="write the result (JSON) here")
    a = p.parse_args(argv)
    res = run_probe(
        a.task,
        a.tokenizer,
        a.seconds,
        a.layers,
        a.hidden,
        a.batch,
        a.lr,
        a.eval_every,
        threads=a.threads,
        system=a.system,
    )
    if a.out:
        Path(a.out).write_text(json.dumps(asdict(res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
