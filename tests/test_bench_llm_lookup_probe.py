"""bench/llm_lookup_probe.py: the text-only control of the ASVR miniature (no Ray, no DeepSpeed)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from asvr.demo import vqa_corpus as vc
from bench import llm_lookup_probe as probe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from asvr.demo.tiny_llm import make_tiny_llm

    texts = [probe._caption_item(np.random.default_rng(i), i, "train").prompt for i in range(200)]
    folder = make_tiny_llm(tmp_path_factory.mktemp("llm"), texts=texts + ["Yes No A B C D"], hidden_size=32)
    return AutoTokenizer.from_pretrained(folder)


def _caption_facts(caption: str) -> list[tuple[str, str, str]]:
    return re.findall(r"[aA] (small|medium|large) (\w+) (circle|square|triangle|star)", caption)


def test_caption_items_hold_their_answer_in_the_prompt():
    """Every colour / shape / size answer can be read off the description in the prompt."""
    checked = 0
    for i in range(300):
        it = probe._caption_item(np.random.default_rng([3, i]), i, "heldout")
        caption, question = it.prompt.split("\n")[:2]
        facts = _caption_facts(caption)
        assert 2 <= len(facts) <= 4
        if it.form != "short":
            continue
        gold = it.candidates[it.gold].lower()
        if m := re.match(r"What colour is the (\w+)\?", question):
            assert (gold, m.group(1)) in {(c, s) for _, c, s in facts}
        elif m := re.match(r"What shape is the (\w+) object\?", question):
            assert (m.group(1), gold) in {(c, s) for _, c, s in facts}
        elif m := re.match(r"What size is the (\w+) (\w+)\?", question):
            assert (gold, m.group(1), m.group(2)) in set(facts)
        elif question == "How many objects are there?":
            assert gold == str(len(facts))
        else:
            continue
        checked += 1
    assert checked > 30


def test_heldout_items_are_balanced():
    yes = [
        it.gold == 0
        for i in range(400)
        if (it := probe._caption_item(np.random.default_rng([5, i]), i, "heldout")).form == "yes_no"
    ]
    assert 0.4 < np.mean(yes) < 0.6
    letters = [probe._pointing_item(np.random.default_rng(i), i, "heldout").gold for i in range(8)]
    assert letters == [0, 1, 2, 3, 0, 1, 2, 3]


def test_encode_supervises_exactly_the_answer(tok):
    it = probe._pointing_item(np.random.default_rng(0), 2, "heldout")
    for c, cand in enumerate(it.candidates):
        full, start = probe._encode(tok, it, c)
        assert full[-1] == tok.eos_token_id
        assert tok.decode(full[start:-1]).strip() == cand
        assert tok.decode(full[:start]).endswith("ASSISTANT:")
    ids, labels, mask = probe._batch([probe._encode(tok, it, 0), probe._encode(tok, it, 3)])
    assert (labels[0] >= 0).sum() == len(probe._encode(tok, it, 0)[0]) - probe._encode(tok, it, 0)[1]
    assert mask.sum(1).tolist() == [len(probe._encode(tok, it, c)[0]) for c in (0, 3)]


def test_score_picks_the_likeliest_candidate(tok):
    """A model that always puts its mass on "C" gets exactly the items whose gold is C."""
    import torch

    c_id = tok("ASSISTANT: C")["input_ids"][-1]

    class AlwaysC(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., c_id] = 10.0
            logits[..., tok.eos_token_id] = 10.0
            return type("Out", (), {"logits": logits})()

    items = [probe._pointing_item(np.random.default_rng(i), i, "heldout") for i in range(12)]
    acc = probe._score(AlwaysC(), tok, items)
    assert acc == {"multiple_choice": pytest.approx(np.mean([it.gold == 2 for it in items]))}


def test_run_probe_smoke(tok, tmp_path):
    import torch

    tok.save_pretrained(tmp_path)
    before = torch.get_num_threads()
    res = probe.run_probe("pointing", str(tmp_path), seconds=0, hidden=32, heldout=8, eval_every=1, threads=1)
    assert torch.get_num_threads() == before  # the session's thread count is given back
    assert res.curve[0]["step"] == 0 and set(res.curve[0]) == {"step", "seconds", "multiple_choice"}
    assert res.chance == {"multiple_choice": 0.25}
    assert vc.INSTRUCTION["multiple_choice"] in probe._pointing_item(np.random.default_rng(0), 0, "train").prompt


def test_pointing_last_moves_only_the_question():
    for i in range(8):
        a = probe._pointing_item(np.random.default_rng(i), i, "heldout")
        b = probe._pointing_last_item(np.random.default_rng(i), i, "heldout")
        q, *opts, _instruction = a.prompt.split("\n")
        assert b.prompt.split("\n") == [*opts, q]
        assert (b.gold, b.candidates) == (a.gold, a.candidates)
        assert opts[a.gold].endswith(q.removeprefix("Which option is ").removesuffix("?"))


def test_encode_without_system_prompt(tok):
    it = probe._pointing_last_item(np.random.default_rng(0), 1, "heldout")
    full, start = probe._encode(tok, it, it.gold, system=False)
    assert tok.decode(full[:start]).replace("<s>", "").strip() == it.prompt + " ASSISTANT:"
    assert tok.decode(full[start:-1]).strip() == it.candidates[it.gold]
    assert len(probe._encode(tok, it, it.gold)[0]) > len(full)  # the system prompt and USER: turn
