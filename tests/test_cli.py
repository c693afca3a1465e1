"""The `dlopt-kernels` command, run in-process through cli.main([...])."""
import json
import re

import pytest
import torch

from dlopt_kernels import _lib, cli, demo


def _table_rows(text: str) -> dict[str, list[str]]:
    """The demo's plain-text table: optimizer name -> cells (split on 2+ spaces)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith(("torch AdamW", "dlopt AdamW")):
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = cells[1:]
    return rows


def test_info_names_versions_build_and_backends(capsys, monkeypatch):
    monkeypatch.delenv("DLOPT_BACKEND", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "python 3." in out
    assert "triton " in out
    assert "adam_step" in out and "cpu tensors: auto -> " in out
    if _lib.LOADED["cpu"]:
        isa = _lib.build_info()["cpu_isa"]
        assert f"C++ CPU library: loaded, built for {isa}" in out
        assert "cpu tensors: auto -> cpu" in out
        assert re.search(r"available: .*\bcpu\b", out)
    else:
        assert "C++ CPU library: NOT loaded" in out and "load errors:" in out
    # the others are listed with a reason
    assert "not cuda: " in out
    if not torch.cuda.is_available():
        assert "cuda tensors" not in out


def test_info_respects_dlopt_backend(capsys, monkeypatch):
    monkeypatch.setenv("DLOPT_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "DLOPT_BACKEND='reference'" in out
    assert "cpu tensors: auto -> reference" in out

    monkeypatch.setenv("DLOPT_BACKEND", "cuda")  # cannot run CPU tensors: reported, exit 1
    assert cli.main(["info"]) == 1
    out = capsys.readouterr().out
    assert "cpu tensors: auto -> ERROR: backend='cuda' cannot run adam_step" in out


def test_demo_trains_both_and_prints_table(capsys):
    rc = cli.main(["demo", "--steps", "40", "--hidden", "128", "--batch-size", "128"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "40/40" in captured.err  # the tqdm bar
    rows = _table_rows(captured.out)
    assert len(rows) == 2, captured.out
    (torch_name, t), (ours_name, o) = rows.items()
    assert torch_name.startswith("torch AdamW (")
    expected = "cpu" if _lib.LOADED["cpu"] else "reference"
    assert ours_name == f"dlopt AdamW ({expected})"
    t_ms, o_ms = float(t[0]), float(o[0])
    assert 0 < t_ms < 1e4 and 0 < o_ms < 1e4
    # fp32 AdamW keeps exp_avg + exp_avg_sq: 8 bytes per param, in both
    assert "(8.0 B/param)" in t[1] and "(8.0 B/param)" in o[1]
    t_loss, o_loss = float(t[2]), float(o[2])
    assert t_loss < 2.0  # it learned something (chance is ln 10 = 2.30)
    assert abs(o_loss - t_loss) <= 0.05 * t_loss


def test_demo_bf16_and_bad_device(capsys):
    rc = cli.main(["demo", "--steps", "10", "--hidden", "64", "--dtype", "bfloat16",
                   "--master-weights", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = _table_rows(out)
    (_, t), (ours_name, o) = rows.items()
    assert "master weights" in ours_name
    assert "(4.0 B/param)" in t[1]  # torch keeps bf16 states for bf16 params
    assert "(12.0 B/param)" in o[1]  # fp32 exp_avg, exp_avg_sq, master copy
    assert float(o[2]) == pytest.approx(float(t[2]), rel=0.05)
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda", "--steps", "1"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_compare_precision_reports_state_bytes(capsys):
    res = demo.compare_precision(steps=6, lrs=[1e-3], every=3, hidden=32, progress=False)
    out = capsys.readouterr().out
    assert "### lr = 0.001" in out and "| step 6 |" in out
    runs = res[1e-3]
    assert [r["optimizer"] for r in runs] == [name for name, _, _ in demo.PRECISION_CONFIGS]
    per_param = [round(r["state_bytes"] / r["params"]) for r in runs]
    assert per_param == [8, 4, 12, 8, 4]
    assert all(r["error"] is None and len(r["curve"]) == 3 for r in runs)


def test_bench_adamw_quick(capsys, tmp_path):
    pytest.importorskip("dlopt_kernels.bench",
                        reason="dlopt_kernels.bench (the benchmark module) is not importable "
                               "in this checkout")
    out_path = tmp_path / "bench.json"
    rc = cli.main(["bench", "adamw", "--quick", "--out", str(out_path), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"results written to {out_path}" in captured.out
    assert "adam" in captured.out.lower()  # the printed table
    data = json.loads(out_path.read_text())
    sections = data.get("benchmarks", data)  # {"benchmarks": {"optim_adam-quick": {...}}}
    assert any("adam" in k for k in sections), list(sections)


def test_bench_unknown_name_is_an_error(capsys):
    pytest.importorskip("dlopt_kernels.bench",
                        reason="dlopt_kernels.bench (the benchmark module) is not importable "
                               "in this checkout")
    assert cli.main(["bench", "no-such-benchmark", "--quick", "--no-progress"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.parametrize("raw, want", [("2.5", 2.5), ("", None), ("0", ValueError),
                                       ("-1", ValueError), ("nan", ValueError),
                                       ("inf", ValueError), ("fast", ValueError)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bench_budget_from_env(monkeypatch, raw, want, device):
    from dlopt_kernels.bench import common
    monkeypatch.setenv("DLOPT_BENCH_BUDGET_S", raw)
    if want is ValueError:
        with pytest.raises(ValueError, match="DLOPT_BENCH_BUDGET_S"):
            common.default_settings(torch.device(device), quick=False)
        return
    got = common.default_settings(torch.device(device), quick=False).budget_s
    assert got == (want if want is not None else (10.0 if device == "cuda" else 20.0))
