"""``inspect`` and ``verify`` of an output directory (pyarrow only, no Ray).

``verify`` re-hashes every shard against the manifest, checks each shard's
schema metadata against the manifest's fingerprint, every code against the
codebook size (``read_shard`` refuses a shard with a code >= K: an "unreadable"
finding naming the first bad key), key uniqueness across shards, and the counting invariant
(``seen == encoded + failed + duplicate``, shard rows == encoded, failure
rows == failed + duplicate + ignored), and reports every input that was cut
short (a truncated or corrupt tar: failure rows at stage ``input``), since the
images after the cut were never seen.  Cost: one read of every shard (~1 s per GB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from asvr.core.errors import FingerprintError, check_fingerprint
from asvr.core.shards import FAILURES, MANIFEST, ShardError, read_shard, sha256_file


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_manifest(out: str | Path) -> dict:
    p = Path(out) / MANIFEST
    if not p.exists():
        raise ShardError(f"{out}: no {MANIFEST} (not an asvr-pipeline output directory)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ShardError(f"{p}: unreadable ({e})") from None


def inspect_out(out: str | Path, n_failures: int = 10) -> Report:
    out = Path(out)
    m = load_manifest(out)
    rep = Report()
    c = m.get("counts", {})
    run = m.get("run", {})
    rep.lines += [
        f"{out}: {'complete' if m.get('complete') else 'INCOMPLETE (run the same command again to finish)'}",
        f"tokenizer {m.get('fingerprint', '')[:16]}  preprocess {run.get('preprocess')}  format {run.get('format')}"
        f"  shard size {run.get('shard_size')}  fast decode {run.get('fast_decode')}",
        "inputs: " + ", ".join(f"{i['path']} ({i['format']})" for i in m.get("inputs", [])),
        f"seen {c.get('seen', 0)}  encoded {c.get('encoded', 0)}  failed {c.get('failed', 0)}"
        f"  duplicate {c.get('duplicate', 0)}  ignored {c.get('ignored', 0)} (not images)",
        f"shards {len(m.get('shards', []))} ({sum(s['rows'] for s in m.get('shards', []))} rows)",
    ]
    if not m.get("complete"):
        rep.problems.append("the run is incomplete")
    fpath = out / FAILURES
    if fpath.exists():
        fails = pq.read_table(fpath)
        if fails.num_rows:
            stages: dict[str, int] = {}
            for s in fails.column("stage").to_pylist():
                stages[s] = stages.get(s, 0) + 1
            rep.lines.append("failures by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))
            for f in fails.slice(0, n_failures).to_pylist():
                rep.lines.append(f"  [{f['stage']}] {f['key']}: {f['error']}")
    return rep


def _check_shard(out: Path, s: dict, fp, keys: set[str], problems: list[str]) -> int:
    """One manifest shard entry: present, hash, fingerprint, rows, keys unique so far -> its rows."""
    path = out / s["file"]
    if not path.exists():
        problems.append(f"{s['file']}: missing")
        return 0
    if sha256_file(path) != s["sha256"]:
        problems.append(f"{s['file']}: sha256 differs from the manifest (modified or corrupt)")
    try:
        meta, table = read_shard(path)
    except Exception as e:  # noqa: BLE001 - any unreadable shard is a finding, not a crash
        problems.append(f"{s['file']}: unreadable ({type(e).__name__}: {e})")
        return 0
    try:
        check_fingerprint(meta.fingerprint, str(fp), s["file"], MANIFEST)
    except FingerprintError as e:
        problems.append(str(e))
    if table.num_rows != s["rows"]:
        problems.append(f"{s['file']}: {table.num_rows} rows, manifest says {s['rows']}")
    for k in table.column("key").to_pylist():
        if k in keys:
            problems.append(f"{s['file']}: duplicate key {k!r}")
        keys.add(k)
    return table.num_rows


def _check_counts(out: Path, counts: dict, rows: int, problems: list[str]) -> int:
    """The counting invariant and the inputs cut short -> the failure rows read."""
    seen, enc, failed, dup = (int(counts.get(k, 0)) for k in ("seen", "encoded", "failed", "duplicate"))
    if seen != enc + failed + dup:
        problems.append(f"counts: seen {seen} != encoded {enc} + failed {failed} + duplicate {dup}")
    if rows != enc:
        problems.append(f"shards hold {rows} rows, manifest says encoded {enc}")
    ign = int(counts.get("ignored", 0))
    fpath = out / FAILURES
    nfail = 0
    if fpath.exists():
        fails = pq.read_table(fpath, columns=["stage", "error"])
        nfail = fails.num_rows
        for stage, err in zip(fails.column("stage").to_pylist(), fails.column("error").to_pylist()):
            if stage == "input":
                problems.append(f"incomplete input: {err}")
    if nfail != failed + dup + ign:
        problems.append(f"{FAILURES} has {nfail} rows, manifest says failed {failed} + duplicate {dup} + ignored {ign}")
    return nfail


def verify_out(out: str | Path) -> Report:
    out = Path(out)
    m = load_manifest(out)
    rep = Report()
    if not m.get("complete"):
        rep.problems.append("manifest says the run is incomplete")
    keys: set[str] = set()
    rows = 0
    listed = set()
    for s in m.get("shards", []):
        listed.add(s["file"])
        rows += _check_shard(out, s, m.get("fingerprint"), keys, rep.problems)
    for p in sorted(out.glob("part-*.parquet")) + sorted(out.glob("shard-*.tar")):
        if p.name not in listed:
            rep.problems.append(f"{p.name}: shard not in the manifest")
    nfail = _check_counts(out, m.get("counts", {}), rows, rep.problems)
    rep.lines.append(f"{out}: {len(listed)} shards, {rows} rows, {nfail} failure rows checked")
    return rep


__all__ = ["Report", "inspect_out", "load_manifest", "verify_out"]
