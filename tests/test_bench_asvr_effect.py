"""The ASVR-effect experiment driver (bench/asvr_effect.py) end to end at a toy size, 2 steps per stage:
corpus -> semantic and appearance tokenizers -> shards (Ray) -> pretrain/SFT per arm -> bench + loss -> summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.asvr_effect import ARMS, ExperimentConfig, mean_std, summarize  # noqa: E402


def test_summary_statistics_and_contrasts():
    cfg = ExperimentConfig(out="x", results="y", seeds=[0, 1], arms=["a", "b"])

    def rec(arm, seed, acc):
        bench = {
            "acc": acc,
            "chance": 0.4,
            "by_category": {"colour": acc},
            "by_kind": {"yes_no": acc},
            "chance_by_category": {"colour": 0.3},
            "chance_by_kind": {"yes_no": 0.5},
        }
        unseen = {**bench, "acc": acc / 2}
        return {
            "arm": arm,
            "seed": seed,
            "benches": {"seen": bench, "unseen": unseen},
            "visual_acc_per_depth": [acc, acc / 2],
            "seconds": 1.0,
        }

    s = summarize(cfg, [rec("a", 0, 0.5), rec("a", 1, 0.6), rec("b", 0, 0.7), rec("b", 1, 0.9)])
    seen, unseen = s["benches"]["seen"], s["benches"]["unseen"]
    assert seen["acc"]["a"]["overall"] == pytest.approx((0.55, 0.0707107), abs=1e-6)
    assert unseen["acc"]["a"]["overall"] == pytest.approx((0.275, 0.0353553), abs=1e-6)
    assert s["arms"]["b"]["visual_acc_per_depth"][1] == pytest.approx((0.4, 0.0707107), abs=1e-6)
    assert unseen["vs_baseline"]["b"]["diff"] == pytest.approx(0.125)
    c = seen["vs_baseline"]["b"]
    # diff 0.25; s.e. sqrt(0.005/2 + 0.02/2) = 0.1118; seeds for 2 s.e.: 8 * 0.0125 / 0.0625 = 1.6 -> 2
    assert c["diff"] == pytest.approx(0.25) and c["se"] == pytest.approx(0.111803, abs=1e-6)
    assert c["resolved"] and c["seeds_for_2se"] == 2
    assert seen["chance"] == {"overall": 0.4, "colour": 0.3, "yes_no": 0.5}
    assert mean_std([1.0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="unknown arms"):
        ExperimentConfig(out="x", results="y", arms=["z"])


def test_two_step_smoke_run_of_the_driver(tmp_path, monkeypatch):
    from bench.asvr_effect import main

    monkeypatch.chdir(tmp_path)
    arms = ["a", "d", "e"]  # a and d share their weight-0 pretraining; e trains on appearance codes
    assert main(["--out", "work", "--results", "res", "--smoke", "--seeds", "0", "--arms", *arms]) == 0
    res = json.loads(Path("res/results.json").read_text())
    runs = {r["arm"]: r for r in res["runs"]}
    assert sorted(runs) == arms
    pretrains = sorted(p.name for p in Path("work/runs").glob("pretrain-*"))
    assert pretrains == ["pretrain-w0-semantic-s0", "pretrain-w1-appearance-s0"]
    for key, r in runs.items():
        for name in ("seen", "unseen"):
            m = r["benches"][name]
            assert 0 <= m["acc"] <= 1 and m["chance"] == pytest.approx(res["benches"][name]["chance"]["overall"])
        assert len(r["visual_acc_per_depth"]) == 2
        cfg = json.loads(Path(f"work/runs/sft-{key}-s0/train_config.json").read_text())
        assert cfg["max_steps"] == 2 and cfg["visual_loss_weight"] == ARMS[key].sft_weight
        assert cfg["tokenizer"].endswith("tok_appearance" if key == "e" else "tok_semantic")
    summary = Path("res/summary.md").read_text()
    assert "| chance |" in summary and "a: baseline" in summary and "seeds needed" in summary
    assert "## Bench `seen`" in summary and "## Bench `unseen`" in summary
    assert Path("res/asvr_effect.png").stat().st_size > 1000
    # rerunning resumes: nothing is trained again
    before = Path("work/runs.jsonl").read_text()
    assert main(["--out", "work", "--results", "res", "--smoke", "--seeds", "0", "--arms", *arms]) == 0
    assert Path("work/runs.jsonl").read_text() == before
