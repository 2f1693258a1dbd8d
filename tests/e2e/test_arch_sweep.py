"""The architecture sweep (``arch_sweep.py``) against its recorded baseline.

Fails on a regression of an (architecture, method) that was ``ok`` in
``arch_sweep_baseline.json``: it is no longer ``ok``; fewer of its layers are swapped; more of its
used linears are left float (even with a reason); or its quantized model no longer compiles with
``fullgraph=True`` where the baseline's did. Architectures that were not ok cannot regress, so they
are not run; ones that became ok are printed (refresh the baseline to keep them).

Time (2 CPU cores, 2 worker processes): the baseline-ok architectures are split into ``SHARDS``
fixed shards by sorted name (architecture i goes to shard i % SHARDS); CI runs shard 0, about a
third of them, each with ``torch.compile(backend="eager", fullgraph=True)`` of the float and the
quantized models, and leaves out the few slowest (over ``SLOW_S`` seconds each in the baseline).
The whole run stops at ``DEADLINE_S``. Architectures whose output the baseline found
nondeterministic are left out. Environment overrides:

    PYMLLM_FX_ARCH_SWEEP=all            every baseline-ok architecture
    PYMLLM_FX_ARCH_SWEEP=2/3            shard 2 of 3 (any i/n)
    PYMLLM_FX_ARCH_SWEEP=llama,t5       these architectures

Refresh the baseline (about 40 minutes on 2 cores), then review its diff:

    python tests/e2e/arch_sweep.py --jobs 2 --compile --json tests/e2e/arch_sweep_baseline.json --quiet
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import arch_sweep  # noqa: E402

BASELINE = HERE / "arch_sweep_baseline.json"
SHARDS = 3
SLOW_S = 30.0  # per architecture, all methods, as recorded in the baseline
TIMEOUT_S = 300.0
DEADLINE_S = 1500.0  # the whole test; past it the architectures not yet run are reported, and it fails
RETRY_AT_MOST = 5  # timeouts and crashes run once more, one process at a time (load, not the library)


def _baseline():
    if not BASELINE.exists():
        pytest.fail(f"{BASELINE.name} is missing; record it with "
                    f"`python tests/e2e/arch_sweep.py --jobs 2 --compile --json {BASELINE} --quiet`")
    data = json.loads(BASELINE.read_text())
    return data, data["records"]


def _selection(records, available):
    """The baseline-ok architectures this run checks, and a line saying which and why."""
    ok = sorted({r["arch"] for r in records if r["outcome"] == "ok"} - {r["arch"] for r in records if r.get("nondeterministic")})
    seconds = {r["arch"]: r.get("arch_seconds", 0.0) for r in records}
    choice = os.environ.get("PYMLLM_FX_ARCH_SWEEP", f"0/{SHARDS}").strip()
    if choice == "all":
        picked, how = ok, "all baseline-ok architectures"
    elif "/" in choice:
        i, n = (int(x) for x in choice.split("/"))
        picked = [a for k, a in enumerate(ok) if k % n == i and seconds.get(a, 0.0) <= SLOW_S]
        how = f"shard {i}/{n} of the baseline-ok architectures (slower than {SLOW_S:.0f}s left out)"
    else:
        picked, how = [a.strip() for a in choice.split(",") if a.strip()], f"PYMLLM_FX_ARCH_SWEEP={choice}"
    gone = [a for a in picked if a not in available]
    picked = [a for a in picked if a in available]
    return picked, f"{how}: {len(picked)} of {len(ok)} ok in the baseline" + (
        f"; not in this transformers' auto mappings: {gone}" if gone else "")


def _fullgraph(record, key):
    return (record.get(key) or {}).get("fullgraph") == "ok"


def regressions(before: dict, after: dict) -> list:
    """(arch, method, what) for every baseline-ok record that got worse; ``before``/``after`` map
    (arch, method) to records."""
    found = []
    for key, old in before.items():
        if old["outcome"] != "ok" or key not in after:
            continue
        new = after[key]
        if new["outcome"] != "ok":
            found.append((*key, f"was ok, now {new['outcome']}: {new.get('message', '')[:300]}"))
            continue
        if (new.get("swapped") or 0) < (old.get("swapped") or 0):
            found.append((*key, f"{new.get('swapped')} layers swapped, {old.get('swapped')} in the baseline"))
        if len(new.get("float_with_reason") or []) > len(old.get("float_with_reason") or []):
            found.append((*key, f"{len(new['float_with_reason'])} used linears left float with a reason, "
                                f"{len(old.get('float_with_reason') or [])} in the baseline: {new['float_with_reason'][:3]}"))
        if "compile_quantized" in new and _fullgraph(old, "compile_quantized") and not _fullgraph(new, "compile_quantized"):
            found.append((*key, f"fullgraph compile of the quantized model now fails: {new['compile_quantized']}"))
    return found


def test_regressions_are_found():
    """The comparison itself: each kind of regression is caught, and an unchanged record is not."""
    ok = {"outcome": "ok", "swapped": 4, "float_with_reason": [], "compile_quantized": {"fullgraph": "ok"}}
    base = {("a", "int8"): ok, ("b", "int8"): {"outcome": "wrong_output"}}
    assert regressions(base, {("a", "int8"): dict(ok), ("b", "int8"): {"outcome": "ok"}}) == []
    for change in ({"outcome": "timeout"}, {"swapped": 3}, {"float_with_reason": [{"path": "x"}]},
                   {"compile_quantized": {"fullgraph": "graph break"}}):
        assert len(regressions(base, {("a", "int8"): {**ok, **change}})) == 1, change


def test_no_regression_against_baseline():
    data, records = _baseline()
    available = arch_sweep.architectures()
    picked, how = _selection(records, available)
    assert picked, f"the selection is empty ({how})"
    methods = tuple(data.get("settings", {}).get("methods", ",".join(arch_sweep.METHODS)).split(","))
    options = {"default_capture": False, "compile": True}
    start = time.time()
    now, left = [], list(picked)
    while left and time.time() - start < DEADLINE_S:  # in slices, so the deadline is checked between them
        chunk, left = left[:40], left[40:]
        now += arch_sweep.sweep({a: available[a] for a in chunk}, methods, jobs=2, timeout=TIMEOUT_S,
                                options=options, progress=False)
    before = {(r["arch"], r["method"]): r for r in records if r["arch"] in picked}
    after = {(r["arch"], r["method"]): r for r in now}
    flaky = sorted({a for (a, _), r in after.items() if r["outcome"] in ("timeout", "crashed")})[:RETRY_AT_MOST]
    if flaky:  # one more try, one process at a time: a timeout under load is not a regression
        again = arch_sweep.sweep({a: available[a] for a in flaky}, methods, jobs=1, timeout=TIMEOUT_S * 2,
                                 options=options, progress=False)
        after.update({(r["arch"], r["method"]): r for r in again})
    found = regressions(before, after)
    improved = sorted(k for k, r in after.items() if before.get(k, {}).get("outcome") not in (None, "ok")
                      and r["outcome"] == "ok")
    print(f"\narch sweep: {how}; {len(now)} records in {time.time() - start:.0f}s"
          f" (baseline: transformers {data.get('versions', {}).get('transformers')}, now {transformers.__version__})")
    if improved:
        print(f"now ok, not in the baseline: {improved}")
    versions = data.get("versions", {})
    drift = "" if versions.get("transformers") == transformers.__version__ else (
        f"\n(the baseline was recorded with transformers {versions.get('transformers')}, this is "
        f"{transformers.__version__}: a changed architecture can move an outcome; refresh the baseline if so)")
    assert not left, f"past the {DEADLINE_S:.0f}s deadline with {len(left)} architectures not run: {left[:10]}"
    assert not found, (f"{len(found)} regression(s) against {BASELINE.name} ({how}):\n"
                       + "\n".join(f"  {a} {m}: {what}" for a, m, what in found) + drift)


def test_baseline_is_current_format():
    """The baseline holds a record per architecture and method, with the outcome classes the sweep uses."""
    data, records = _baseline()
    assert records and set(data["summary"]) >= {"architectures", "outcomes_by_method", "patterns"}
    assert {r["outcome"] for r in records} <= set(arch_sweep.OUTCOMES)
    methods = data["settings"]["methods"].split(",")
    assert len(records) == data["summary"]["architectures"] * len(methods)
