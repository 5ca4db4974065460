"""Run metrics: ``RUN/metrics.jsonl`` (one JSON object per optimizer step), optional
TensorBoard, and ``RUN/loss.png`` at the end.  Only rank 0 writes.

On resume the file is cut back to the checkpoint's step first, so a run that
crashed after its last checkpoint does not log the replayed steps twice.  A
kill in the middle of an append leaves a torn last line: readers skip it and
the resume drops it (its step is replayed); a bad line anywhere else is an
error naming its line number.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist

from asvr.core.atomic import atomic_path, atomic_write
from asvr.core.errors import AsvrError

METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, resume_step: int = 0):
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate(self, step: int) -> None:
        keep = [json.dumps(r) for r in parse_metrics(self.path) if r["step"] <= step]
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class MetricsError(AsvrError):
    """metrics.jsonl has a broken line other than a torn last one; one line."""


def parse_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file; a torn last line (a kill during an append) is skipped."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                break  # the last line, cut short
            raise MetricsError(f"{path}: line {i + 1} is not a metrics record; fix or remove it") from None
        rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return parse_metrics(path) if path.exists() else []


STAGE_NOTES = {
    "pretrain": "LLM frozen: only the projector and the visual head learn, so the text loss moves only "
    "through the image tokens and stays nearly flat",
}


def loss_figure(rows: list[dict], title: str = "", note: str = ""):
    """The figure of ``loss.png``: loss, text loss and visual loss against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 4.4 if note else 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    for key in ("loss", "loss_text", "loss_visual"):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    if note:
        ax.set_title(textwrap.fill(note, 80), fontsize=8, color="0.3")
    fig.tight_layout()
    return fig


def plot_losses(run_dir: str | Path, stage: str | None = None) -> Path | None:
    """``RUN/loss.png`` (:func:`loss_figure`), titled with the run folder and the stage
    (PNG metadata ``Title``/``Description`` hold the title and the note)."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    run_dir = Path(run_dir)
    name = "/".join(run_dir.resolve().parts[-2:])  # runs/pretrain
    title = f"run {name}: {stage} stage" if stage else f"run {name}"
    note = STAGE_NOTES.get(stage or "", "")
    fig = loss_figure(rows, title, note)
    out = run_dir / LOSS_PLOT
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Title": title, "Description": note})
    return out


def reduce_window(pending: list[tuple[dict, list[str], torch.Tensor]], device: torch.device, n: int) -> list[dict]:
    """The records of a window of steps ``(info, loss names, loss sums)``: the loss sums and token
    counts of all its steps reduced over the ranks in one all_reduce and copied to the host once;
    losses divided by ``n`` (micro-batches x ranks), tokens summed over the ranks."""
    tokens = torch.tensor([float(info["tokens"]) for info, _, _ in pending], device=device)
    vec = torch.cat([v for _, _, v in pending] + [tokens])
    dist.all_reduce(vec)
    vals = vec.cpu().tolist()
    out, pos = [], 0
    for i, (info, keys, _) in enumerate(pending):
        rec = {"step": info["step"], **{k: vals[pos + j] / n for j, k in enumerate(keys)}}
        pos += len(keys)
        rec.update(tokens=vals[len(vals) - len(pending) + i], lr=info["lr"], epoch=info["epoch"])
        if device.type == "cuda":  # the allocator's counter: a host read, no sync
            rec["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out.append(rec)
    return out
