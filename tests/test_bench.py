"""`qso3-tvm bench`: smoke run on a tiny model (reports exist, parse, every route has a result or a
stated skip reason), the MAC count against torch's own counter, and the statistics. No timing
assertions: the machine is shared."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qso3_tvm.apps.bench import run as bench
from qso3_tvm.apps.bench import stats as bench_stats
from qso3_tvm.cli import app
from qso3_tvm.nn.checkpoint import save_model
from qso3_tvm.nn.testing import tiny_model

runner = CliRunner()
ROUTES = ["eager-fp32", "eager-int8", "tvm-int8-tuned"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model(path, tiny_model(torch.float32, energy_shift=[0.0] * 5))
    return path


def test_bench_smoke(tiny_ckpt, tmp_path):
    # eager-int8 runs the tiny model's workload with the bundled int8 checkpoint; tvm-int8-tuned has
    # no artifact or database (--tuning-records none) and must say so
    r = runner.invoke(app, ["bench", "--model-fp32", str(tiny_ckpt), "--routes", ",".join(ROUTES),
                            "--workloads", "ethanol-b1,aspirin-b1", "--threads", "1", "--rounds", "1", "--budget-ms", "5",
                            "--max-calls", "2", "--warmup", "0", "--cache-dir", str(tmp_path / "cache"), "--tuning-records", "none",
                            "--report-dir", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "bench.md").read_text()
    res = json.loads((tmp_path / "rep" / "bench" / "bench.json").read_text())
    assert (tmp_path / "rep" / "bench" / "bench.png").stat().st_size > 1000
    assert not list((tmp_path / "rep").rglob(".*tmp*")), "temporary report files left behind"
    assert "qso3-tvm bench --model-fp32" in md and "## Physical limit" in md and "load average" in md
    assert set(res["routes"]) == set(ROUTES)
    for e in res["results"]:
        assert ("median_ms" in e and e["n"] >= 1) or e.get("skip"), e
    got = {(e["route"], e["mode"]): e for e in res["results"]}
    for mode in ("E", "E+F"):
        assert got[("eager-fp32", mode)]["median_ms"] > 0
        assert got[("eager-int8", mode)]["median_ms"] > 0
        assert "--tvm-int8-tuned" in got[("tvm-int8-tuned", mode)]["skip"]
    assert got[("eager-fp32", "E+F")]["max_abs_dF_mev_per_a"] == 0.0
    assert res["routes"]["eager-fp32"]["processes"]["1"]["peak_rss_kb"] > 0
    assert res["routes"]["eager-int8"]["weight_bytes"] > 0 and res["routes"]["eager-fp32"]["weight_bytes"] > 0
    assert res["macs"]["ethanol-b1"]["counted_linear"]["forward"] == res["macs"]["ethanol-b1"]["forward_linear_per_edge"]
    assert res["physical_limit"]["rows"]
    assert res["workloads"]["ethanol-b1"]["neighbor_list_ms"] > 0 and "neighbor list ms" in md
    scaling = md.split("## How cost grows")[1].split("\n## ")[0]  # µs per atom, one column per workload
    row = next(line for line in scaling.splitlines() if line.startswith("| 1 | E | eager-fp32 |"))
    per_atom = [float(x) for x in row.strip("| ").split(" | ")[3:]]
    e = next(x for x in res["results"] if x["case"] == "ethanol-b1/E" and x["route"] == "eager-fp32" and x["threads"] == 1)
    assert len(per_atom) == 2 and per_atom[0] == pytest.approx(1e3 * e["median_ms"] / 9, rel=0.01), row


def test_bench_rejects_bad_input(tmp_path):
    r = runner.invoke(app, ["bench", "--routes", "eager-fp32,warp-drive", "--report-dir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown route" in r.output
    r = runner.invoke(app, ["bench", "--tvm-int8", str(tmp_path), "--report-dir", str(tmp_path)])
    assert r.exit_code == 2 and "not a compiled artifact" in r.output
    r = runner.invoke(app, ["bench", "--routes", "", "--report-dir", str(tmp_path)])
    assert r.exit_code == 2 and "nothing to measure: --routes empty" in r.output
    r = runner.invoke(app, ["bench", "--workloads", "qm9-b0", "--routes", "eager-fp32", "--report-dir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown workload 'qm9-b0'" in r.output
    assert not (tmp_path / "bench.md").exists() and not (tmp_path / "bench").exists()


def test_bench_hands_workers_absolute_paths(tmp_path, monkeypatch):
    """Workers run in the work folder: a model or artifact given relative to the user's folder must still be found."""
    from qso3_tvm.apps.bench.run import BenchConfig, _check_config

    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    (tmp_path / "fp.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = BenchConfig(tvm_fp32="art", model_fp32="fp.pt")
    _check_config(cfg)
    assert cfg.tvm_fp32 == str(tmp_path.resolve() / "art") and cfg.model_fp32 == str(tmp_path.resolve() / "fp.pt")
    assert cfg.model_int8 == "ethanol-int8"  # a bundled name stays a name


def test_mac_count_matches_torch_counter():
    """The analytic Linear MACs equal torch's FlopCounterMode count on the bundled model (which runs the radial
    filter per edge); the floor's count runs it once per pair of edges."""
    from qso3_tvm.graph.molecules import MoleculeSet
    from qso3_tvm.nn.batch import make_batch
    from qso3_tvm.nn.checkpoint import load_payload

    mols, _ = bench.workload_molecules("aspirin-b1", (1, 6, 7, 8, 9))
    b = make_batch(MoleculeSet.from_molecules(mols), [0], (1, 6, 7, 8, 9), 5.0)
    macs = bench_stats.mac_count(load_payload("ethanol-fp32")["config"], len(b.species), len(b.src))
    counted = bench_stats.counted_linear_macs("ethanol-fp32", mols)
    assert counted["forward"] == macs["forward_linear_per_edge"]
    # forces need input gradients only: one product per Linear in the backward
    assert counted["energy_forces"] == pytest.approx(2 * macs["forward_linear_per_edge"], rel=0.02)
    cfg = load_payload("ethanol-fp32")["config"]
    filter_macs = cfg["layers"] * (len(b.src) // 2) * (cfg["n_rbf"] * cfg["channels"] + 3 * cfg["channels"] ** 2)
    assert len(b.src) % 2 == 0 and macs["forward_linear"] == macs["forward_linear_per_edge"] - filter_macs


def test_stats_and_paired_speedup():
    s = bench_stats.stats([[1e-3, 2e-3], [3e-3]])
    assert s["median_ms"] == pytest.approx(2.0) and s["n"] == 3 and s["rounds"] == 2
    sp = bench_stats.paired_speedup([[4e-3], [2e-3]], [[1e-3], [2e-3]])
    assert sp["median"] == pytest.approx(2.5) and sp["min"] == pytest.approx(1.0) and sp["max"] == pytest.approx(4.0)
    pk = bench_stats.peaks({"mhz": 2000.0, "flags": ["avx512f", "avx512_vnni"]}, 2)
    assert pk["fp32_gmac_s"] == pytest.approx(128.0) and pk["int8_gmac_s"] == pytest.approx(512.0)
    m = {"forward_linear": 128e6, "forward_elementwise": 0}
    assert bench_stats.floor_ms(m, "E", False, pk) == pytest.approx(1.0)
    assert bench_stats.floor_ms(m, "E+F", True, pk) == pytest.approx(0.5)
    assert np.isfinite(bench_stats.mac_count({"channels": 8, "layers": 1, "n_rbf": 4}, 3, 6)["edge_share"])
