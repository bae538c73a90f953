"""Smoke test of the benchmarks: each runs at a tiny budget (seconds), writes JSON of the documented
shape, the numpy KL check agrees with flowspec's metric, and docs generation works on the results."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import overhead, quality, report, sampling, step_cost, verify


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read(path):
    record = json.loads(path.read_text())
    assert record["schema"] == 1
    assert {"benchmark", "command", "date", "machine", "config", "results"} <= set(record)
    assert {"cpu", "torch", "torch_threads", "device"} <= set(record["machine"])
    return record


def test_benchmarks_and_report(tmp_path):
    cpu = tmp_path / "results" / "cpu"
    tiny = ["--batch", "64", "--width", "16", "--depth", "2", "--reps", "2", "--inner", "1", "--warmup", "1"]
    step_cost.main(tiny + ["--out", str(cpu / "step_cost.json")])
    r = read(cpu / "step_cost.json")["results"]
    assert set(r["methods"]) == {"fm", "lsd", "esd", "esd-none", "psd-u", "psd-m"}
    assert r["methods"]["fm"]["ratio"]["median"] == 1.0
    assert r["methods"]["lsd"]["model_ratio_c1.5"] == pytest.approx(0.25 * 2.5 + 0.75)
    assert r["methods"]["psd-u"]["model_ratio_c1.5"] == pytest.approx(0.25 * 3 + 0.75)
    # the ESD spec as written (stop_gradient = "full") and its one-jvp variant
    assert (r["methods"]["esd"]["cost_formula"], r["methods"]["esd-none"]["cost_formula"]) == ("1 + 2C", "1 + C")
    # counted matrix products: one augmented jvp costs what LSD's jvp in t does; the full stop-gradient's
    # second, graph-free jvp adds to it; PSD's three passes (one with a graph) cost less than either
    flops = {m: v["flop_ratio"] for m, v in r["methods"].items()}
    assert flops["fm"] == 1.0 and flops["esd-none"] == flops["lsd"] and flops["psd-u"] == flops["psd-m"]
    assert 1.0 < flops["psd-u"] < flops["lsd"] < flops["esd"]
    assert r["C"]["C"]["median"] > 0

    overhead.main(tiny + ["--out", str(cpu / "overhead.json")])
    r = read(cpu / "overhead.json")["results"]
    assert r["loss_grad_relative_mismatch"] < 1e-4  # the hand-written step computes the same loss
    assert r["ratio"]["median"] > 0

    quality.main(["--seeds", "1", "--steps", "3", "--batch", "32", "--num-samples", "500", "--methods", "lsd,fm",
                  "--out", str(cpu / "quality.json"), "--runs-dir", str(tmp_path / "runs")])
    rec = read(cpu / "quality.json")
    rows = {r["method"]: r["rows"] for r in rec["results"]["runs"]}
    assert set(rows["lsd"]) == {f"K-{k}" for k in quality.KS}
    assert {f"euler-{k}" for k in quality.KS} <= set(rows["fm"])
    assert any(k.startswith("dopri5") for k in rows["fm"])
    assert rec["results"]["aggregate"]["lsd"]["K-1"]["kl"]["n"] == 1

    # the same budget with flowspec's old network and recipe: the report sets the two side by side
    quality.main(["--seeds", "1", "--steps", "3", "--batch", "32", "--num-samples", "500", "--methods", "lsd",
                  "--setup", "before", "--out", str(cpu / "quality-before.json"), "--runs-dir", str(tmp_path / "old")])
    before = read(cpu / "quality-before.json")
    assert before["config"]["setup_name"] == "before"
    assert 'network.init="torch"' in before["results"]["runs"][0]["overrides"]

    v = verify.main([str(cpu / "quality.json")])
    assert v["checked"] == 5 + 6 and v["max_abs_diff"] < 1e-9

    sampling.main(["--runs", str(tmp_path / "runs"), "--num-samples", "300", "--reps", "1",
                   "--out", str(cpu / "sampling.json")])
    r = read(cpu / "sampling.json")["results"]
    assert {"K-1", "K-2", "K-4"} <= set(r["rows"]) and set(r["matched"]) == {"K-1", "K-2", "K-4"}

    out = report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "docs" / "results.md")])
    text = out.read_text()
    assert "## CPU" in text and "No results yet in `benchmarks/results/gpu/`" in text
    for heading in ("Step cost", "Overhead", "Quality", "Sampling throughput", "paper, Table 1"):
        assert heading in text
    assert (tmp_path / "docs" / "results-quality-cpu.png").stat().st_size > 0
    assert "recomputed 11 KL values" in text
    assert "#### Before and after the paper's network: `quality-before.json` against `quality.json`" in text
    row = next(line for line in text.splitlines() if line.startswith("| LSD | ") and line.count("|") == 9)
    assert row.endswith(("| yes |", "| **no** |"))


def test_verify_kl_matches_flowspec_metric():
    """The numpy recomputation and flowspec's HistogramKL agree on the same samples."""
    from flowspec.data.toy2d import Checkerboard
    from flowspec.metrics import HistogramKL

    data = Checkerboard(Checkerboard.Options())
    g = torch.Generator().manual_seed(0)
    for x in (data.sample(20_000, g), torch.randn(5000, 2, generator=g) * 3):
        assert verify.kl(x.numpy()) == pytest.approx(HistogramKL()(x, data, g), abs=1e-9)
    p, _ = verify.cell_masses()
    assert p.sum() == pytest.approx(1.0)


def test_quality_protocol_and_method_seeds():
    assert quality.parse_method_seeds("lsd=2, esd=1") == {"lsd": 2, "esd": 1}
    p = quality.PROTOCOLS["paper-cpu"]
    assert (p["steps"], p["batch"], p["num_samples"], quality.parse_method_seeds(p["method_seeds"])) == \
        (3000, 4096, 64_000, {"lsd": 2})


def test_ablation_rows_are_one_line_changes_of_the_shipped_spec(tmp_path):
    from benchmarks import ablation

    out = tmp_path / "ablation.json"
    rows = ablation.main(["--steps", "3", "--batch", "32", "--num-samples", "300", "--seeds", "1",
                          "--only", "shipped,depth 4", "--out", str(out)])
    assert list(rows) == ["shipped", "depth 4"]
    assert rows["depth 4"]["set"] == "--set network.depth=4" and not rows["depth 4"]["same_as_shipped"]
    assert all(v > 0 for v in rows["shipped"]["mean"].values())
    lines = report.ablation_section("ablation", read(out))
    assert any(line.startswith("| depth 4 | `--set network.depth=4` |") for line in lines)
