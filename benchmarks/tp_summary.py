"""One table from several e2e.py result files: tp 1 against tp N for the same model and method.

    python benchmarks/tp_summary.py out/*.json [--json out/tp_summary.json]

Rows are (model, method, tp, all-reduce). "vs tp1" divides by the tp 1 row of the same model and
method measured with the same settings (prompt, tokens, compile mode); "logits vs tp1" compares the
``logits_probe`` fingerprints of the two runs (relative error, and argmax agreement over the 64
positions), which is how a model too large for one GPU is checked; ``in-run`` is the tp-N run's own
comparison against tp 1 on rank 0 where it made one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GiB, format_table, load_json  # noqa: E402

SHAPE = ("tiny", "layers", "hidden", "intermediate", "vocab")  # the same weights (same seed): logits compare
SAME = SHAPE + ("prompt_len", "new_tokens", "prefill_len", "compile", "lean_mode")  # timings compare too


def rows_of(paths: List[Path]) -> List[Dict[str, Any]]:
    rows = []
    for path in paths:
        for method, r in load_json(path).get("results", {}).items():
            setup = r.get("setup", {})
            rows.append({"file": path.name, "method": method, "model": setup.get("model_name", setup.get("model")),
                         "tp": setup.get("tp", 1), "all_reduce": setup.get("all_reduce") or "-", "setup": setup, "r": r})
    return sorted(rows, key=lambda x: (str(x["model"]), x["method"], x["tp"], x["all_reduce"]))


def baseline(row: Dict[str, Any], rows: List[Dict[str, Any]], keys=SAME) -> Dict[str, Any]:
    """The tp 1 result of ``row``'s model and method whose setup agrees on ``keys`` ({} if none)."""
    if row["tp"] == 1:
        return {}
    for other in rows:
        if (other["tp"] == 1 and other["model"] == row["model"] and other["method"] == row["method"]
                and all(other["setup"].get(k) == row["setup"].get(k) for k in keys) and "error" not in other["r"]):
            return other["r"]
    return {}


def probe_diff(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[str]:
    x, y = a.get("logits_probe"), b.get("logits_probe")
    if not x or not y or len(x) != len(y):
        return None
    err = math.sqrt(sum((p - q) ** 2 for p, q in zip(x, y)) / max(sum(p * p for p in x), 1e-30))
    ax, ay = a.get("logits_argmax") or [], b.get("logits_argmax") or []
    agree = sum(p == q for p, q in zip(ax, ay))
    return f"{err:.1e} {agree}/{len(ax)}"


def summarize(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for row in rows:
        r = row["r"]
        b = baseline(row, rows)
        split = r.get("split_ms_per_token") or {}
        entry = {
            "model": row["model"], "method": row["method"], "tp": row["tp"], "all_reduce": row["all_reduce"],
            "file": row["file"], "error": r.get("error"),
            "lean_tok_s": r.get("lean_tok_s"), "lean_ms_per_token": r.get("lean_ms_per_token"),
            "prefill_ms": r.get("prefill_ms"),
            "split_ms": {k: split.get(k) for k in ("linears", "all_reduce", "rest")} if split else None,
            "peak_gib_per_rank": [p / GiB if p is not None else None for p in r.get("max_peak_bytes_per_rank") or []],
            "weights_gib_per_rank": (r.get("weight_bytes") or {}).get("total", 0) / GiB or None,
            "lean_vs_tp1": r["lean_tok_s"] / b["lean_tok_s"] if r.get("lean_tok_s") and b.get("lean_tok_s") else None,
            "prefill_vs_tp1": b["prefill_ms"] / r["prefill_ms"] if r.get("prefill_ms") and b.get("prefill_ms") else None,
            "logits_vs_tp1": probe_diff(baseline(row, rows, SHAPE), r),
            "logits_in_run": r.get("logits_rel_err_vs_tp1"),
            "failed": sorted(r.get("errors", {})) + (["split"] if "split_error" in r else []),
        }
        out.append(entry)
    return out


def table(entries: List[Dict[str, Any]]) -> str:
    def f(x, spec):
        return None if x is None else format(x, spec)

    rows = []
    for e in entries:
        if e["error"]:
            rows.append([e["model"], e["method"], e["tp"], e["all_reduce"]] + [None] * 9 + [e["error"].splitlines()[0][:60]])
            continue
        split = e["split_ms"]
        rows.append([
            e["model"], e["method"], e["tp"], e["all_reduce"], f(e["lean_tok_s"], ".1f"), f(e["lean_ms_per_token"], ".2f"),
            "/".join(f"{split[k]:.2f}" for k in ("linears", "all_reduce", "rest")) if split and None not in split.values() else None,
            f(e["prefill_ms"], ".1f"),
            ",".join(f"{p:.1f}" for p in e["peak_gib_per_rank"]) if e["peak_gib_per_rank"] and None not in e["peak_gib_per_rank"] else None,
            f(e["weights_gib_per_rank"], ".2f"),
            f(e["lean_vs_tp1"], ".2f"), f(e["prefill_vs_tp1"], ".2f"),
            e["logits_vs_tp1"] or f(e["logits_in_run"], ".1e"), ",".join(e["failed"]) or None,
        ])
    headers = ["model", "method", "tp", "all-reduce", "lean tok/s", "ms/tok", "lin/ar/rest ms", "prefill ms",
               "peak GiB/rank", "weights GiB/rank", "decode vs tp1", "prefill vs tp1", "logits vs tp1", "failed"]
    return format_table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    entries = summarize(rows_of([f for f in args.files if f.exists()]))
    print(table(entries))
    if args.json:
        args.json.write_text(json.dumps(entries, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
