"""A benchmark section as text (`format_report`: one table per case, then the
targets) and as JSON merged into `benchmarks/results/<device>-<date>.json`
(`write_results`), without clobbering the other benchmarks' sections in that file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report(section: dict[str, Any]) -> str:
    """The tables of a section, as text."""
    env, bw = section["env"], section["bandwidth"]
    lines = [
        f"{section['benchmark']}{' (quick)' if section['quick'] else ''} on {env['device']} "
        f"({env['device_name']}, {env['cpu_cores']} cores, torch {env['torch']}, "
        f"{env['torch_threads']} threads)",
        f"measured bandwidth: {bw['gbps']:.1f} GB/s = {bw['method']}, "
        f"{bw['numel'] / 2**20:g}M elements, {bw['bytes_per_elem']} B/elem, median of "
        f"{len(bw['samples_ms'])} (before / after the cases: "
        + " / ".join(f"{g:.1f}" for g in bw.get("gbps_per_measurement", [])) + " GB/s)",
        "speedup = baseline median / our median; GB/s = bytes/param x params / median time",
    ]
    if section.get("timing") and env["device_type"] != "cpu":
        lines.append(f"timing: {section['timing']}")
    load = section.get("load_average_start")
    if env["device_type"] == "cpu" and load and load[0] > 0.5 * env["cpu_cores"]:
        lines.append(f"WARNING: load average {load[0]:.2f} on {env['cpu_cores']} cores before "
                     "the run: other work shares these cores, so the timings are unreliable")
    for case in section["cases"]:
        lines.append("")
        lines.append(f"[{case['name']}] {case['title']}: {case['numel']:,} params in "
                     f"{case['num_tensors']} tensors; {case['rounds']} rounds after "
                     f"{case['warmup']} warm-up steps")
        bases = [r["label"] for r in case["results"] if r["role"] == "baseline" and "median_ms" in r]
        sp = {(s["ours"], s["baseline"]): s["speedup"] for s in case["speedups"]}
        width = max([len(r["label"]) for r in case["results"]] + [14])
        head = (f"  {'implementation':<{width}}  {'role':<8} {'median ms':>10} {'min ms':>9} "
                f"{'B/param':>7} {'GB/s':>7} {'% BW':>6}")
        idle = any("idle_median_ms" in r for r in case["results"])
        if idle:
            head += f" {'idle ms':>9} {'idle %BW':>8}"
        head += "".join(f"  {'vs ' + b:>{max(10, len(b) + 3)}}" for b in bases)
        lines.append(head)
        for r in case["results"]:
            if "error" in r:
                lines.append(f"  {r['label']:<{width}}  {r['role']:<8} FAILED: {r['error']}")
                continue
            line = (f"  {r['label']:<{width}}  {r['role']:<8} {r['median_ms']:>10.3f} "
                    f"{r['min_ms']:>9.3f} {r['bytes_per_param']:>7.1f} {r['gbps']:>7.1f} "
                    f"{_fmt(r['pct_bandwidth'], '5.0f'):>5}%")
            if idle:
                line += (f" {_fmt(r.get('idle_median_ms'), '.3f'):>9} "
                         f"{_fmt(r.get('idle_pct_bandwidth'), '.0f'):>7}%")
            for b in bases:
                s = sp.get((r["label"], b))
                line += f"  {(_fmt(s, '.2f') + 'x') if s is not None else '':>{max(10, len(b) + 3)}}"
            lines.append(line)
        notes = [f"    {r['label']}: {r['note']}" for r in case["results"] if r.get("note")]
        if notes:
            lines += ["  notes:"] + notes
    targets = section.get("targets")
    if targets is not None:
        lines.append("")
        if not targets:
            lines.append(f"targets: none defined for {env['device_type']}")
        else:
            lines.append("targets:")
            for t in targets:
                val = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
                status = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
                line = (f"  {status:<6} {t['case']}: {t['what']} = {val} "
                        f"(target >= {t['threshold']:g}{t['unit']})")
                if t.get("value_idle") is not None:
                    line += f"; from an idle GPU {t['value_idle']:.2f}{t['unit']}"
                lines.append(line)
    lines.append("")
    load = section.get("load_average_start"), env.get("load_average")
    lines.append(f"total wall time {section['wall_s']:.1f} s; machine load average (1 min) at "
                 f"start / end: {_fmt(load[0] and load[0][0], '.2f')} / "
                 f"{_fmt(load[1] and load[1][0], '.2f')} on {env['cpu_cores']} cores")
    return "\n".join(lines)


def results_path(section: dict[str, Any], out: os.PathLike | str) -> Path:
    """`out` is a .json file, or a folder that gets <device>-<YYYY-MM-DD>.json."""
    out = Path(out)
    if out.suffix == ".json":
        return out
    day = section["started_utc"][:10]
    return out / f"{section['env']['device']}-{day}.json"


def write_results(section: dict[str, Any], out: os.PathLike | str, key: Optional[str] = None) -> Path:
    """Merge `section` into the results file under benchmarks[key] (default: the
    benchmark's name), keeping every other benchmark's section; return the path."""
    path = results_path(section, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
    env = section["env"]
    data["device"] = env["device"]
    data["device_info"] = {k: env[k] for k in ("device_name", "device_type", "cpu_model",
                                               "cpu_cores", "platform") if k in env}
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, dict):
        benchmarks = {}
    benchmarks[key or section["benchmark"]] = section
    data["benchmarks"] = dict(sorted(benchmarks.items()))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
