#!/usr/bin/env python3
"""Print the README's benchmark tables (markdown) from a results file of benchmarks/results/.

    python benchmarks/tables.py benchmarks/results/cpu-intel-xeon-2c-2026-11-26.json [SECTION ...]
    python benchmarks/tables.py --backend triton benchmarks/results/nvidia-h200-2026-11-26.json

One table per benchmark section: for each case, our default backend's (or --backend's)
median step time,
each baseline's, our speedup against each, and the share of the measured bandwidth we
reach (GPU runs since 2026-11-27 add the same from an idle GPU, the host's time
before the first kernel counted in full); then the section's targets, met or missed,
as the benchmark evaluated them. The
README quotes this output as is, so its numbers always come from a committed run.
"""
from __future__ import annotations

import json
import sys
from typing import Any


def _ours_row(case: dict[str, Any], auto: str) -> dict[str, Any] | None:
    """Our default backend's row of a case: plain "dlopt[auto]", else the first
    row of ours with that backend (the bf16 case labels rows "dlopt[auto] bf16 SR")."""
    ours = [r for r in case["results"] if r["role"] == "ours" and f"[{auto}]" in r["label"]]
    plain = [r for r in ours if r["label"] == f"dlopt[{auto}]"]
    return (plain or ours or [None])[0]


def _idle_cell(case: dict[str, Any], ours: dict[str, Any]) -> str:
    if "idle_median_ms" not in ours:
        return "-"
    sps = ", ".join(f"{sp['speedup_idle']:.2f}x" for sp in case["speedups"]
                    if sp["ours"] == ours["label"] and "speedup_idle" in sp)
    return f"{ours['idle_median_ms']:.2f}; {sps}; {ours['idle_pct_bandwidth']:.0f}%"


def section_table(name: str, sec: dict[str, Any], backend: str | None = None) -> str:
    auto = backend or sec.get("auto_backend", "cpu")
    bw = sec["bandwidth"]["gbps"]
    lines = [f"**{name}** (measured bandwidth {bw:.1f} GB/s; load average at start "
             f"{sec['load_average_start'][0]:.2f} on {sec['env']['cpu_cores']} cores; "
             f"{sec['started_utc'][:16]}Z)", "",
             "| case | ours: median ms | baselines: median ms (our speedup) | ours % of BW |",
             "|---|---|---|---|"]
    # GPU runs since 2026-11-27 also time each step from an idle GPU (host time in full)
    idle = any("idle_median_ms" in r for c in sec["cases"] for r in c["results"])
    if idle:
        lines[-2] += " from an idle GPU: ours ms, speedups, % of BW |"
        lines[-1] += "---|"
    if backend:
        lines[0] += f", backend {backend}"
    for case in sec["cases"]:
        ours = _ours_row(case, auto)
        if ours is None:
            continue
        cells = []
        for sp in case["speedups"]:
            if sp["ours"] == ours["label"]:
                base = next(r for r in case["results"] if r["label"] == sp["baseline"])
                cells.append(f"{base['label']} {base['median_ms']:.2f} ({sp['speedup']:.2f}x)")
        line = (f"| {case['name']} | {ours['label']} {ours['median_ms']:.2f} | "
                f"{'; '.join(cells)} | {ours['pct_bandwidth']:.0f}% |")
        if idle:
            line += f" {_idle_cell(case, ours)} |"
        lines.append(line)
    targets = [t for t in sec.get("targets") or [] if not backend or f"[{backend}]" in t["what"]]
    if targets:
        lines += [""] + [
            f"- {'met' if t['met'] else '**MISSED**'}: {t['case']} {t['what']} = "
            f"{t['value']:.2f}{t['unit']} (target >= {t['threshold']:g}{t['unit']})"
            + (f"; from an idle GPU {t['value_idle']:.2f}{t['unit']}"
               if t.get("value_idle") is not None else "")
            for t in targets]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    backend = None
    if argv[:1] == ["--backend"] and len(argv) >= 2:
        backend, argv = argv[1], argv[2:]
    if not argv:
        print(__doc__)
        return 2
    try:
        with open(argv[0]) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"tables.py: cannot read results file {argv[0]!r}: {exc}", file=sys.stderr)
        return 2
    names = argv[1:] or list(data["benchmarks"])  # the sections asked for, in that order
    unknown = [n for n in names if n not in data["benchmarks"]]
    if unknown:
        print(f"tables.py: no section {unknown} in {argv[0]}; it has "
              f"{sorted(data['benchmarks'])}", file=sys.stderr)
        return 2
    missing = [n for n in names if backend and backend not in data["benchmarks"][n].get(
        "ours_backends", [backend])]
    if missing:
        print(f"tables.py: backend {backend!r} was not timed in {missing}", file=sys.stderr)
        return 2
    print("\n\n".join(section_table(name, data["benchmarks"][name], backend) for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
