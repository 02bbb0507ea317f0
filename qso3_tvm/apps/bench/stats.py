"""Statistics of the timed rounds, multiply-accumulate counts, and the physical limit they imply."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .routes import INT8_ROUTES

if TYPE_CHECKING:
    from .run import BenchConfig

# peak multiply-accumulates per cycle per core: AVX-512, two 512-bit FMA ports on Xeon server cores (int8: vpdpbusd);
# AVX2, two 256-bit ports (int8: vpmaddubsw, 32 byte pairs each)
MAC_PER_CYCLE = {"fp32": 2 * 16, "int8": 2 * 64}
MAC_PER_CYCLE_AVX2 = {"fp32": 2 * 8, "int8": 2 * 32}


# ---------------------------------------------------------------- timing statistics
def stats(rounds: list[list[float]]) -> dict | None:
    samples = np.array(sum(rounds, []))
    if not len(samples):
        return None
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return {"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "iqr_rel": (q3 - q1) / med, "min_ms": samples.min() * 1e3, "n": int(len(samples)), "rounds": len(rounds),
            "round_medians_ms": [float(np.median(r)) * 1e3 for r in rounds]}


def paired_speedup(ref_rounds: list[list[float]], rounds: list[list[float]]) -> dict | None:
    """Per round: reference median / route median (the routes alternate within a round)."""
    n = min(len(ref_rounds), len(rounds))
    if not n:
        return None
    r = np.array([np.median(ref_rounds[i]) / np.median(rounds[i]) for i in range(n)])
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max()), "rounds": n}


# ---------------------------------------------------------------- multiply-accumulates
def mac_count(cfg: dict, atoms: int, edges: int) -> dict:
    """Multiply-accumulates of one forward pass, from the model config (see nn.model):
    per layer and edge: radial filter MLP (R->F->3F) plus ~23F elementwise (q/k normalisation and dot,
    attention weight, scalar and vector messages, neighbor sums); per layer and atom: q, k (FxF),
    value (Fx2F), W v and vec_uv on 3 components (3FxF, 3Fx2F), update MLP (2F->F->3F) plus ~12F
    elementwise; energy head F->F->1; radial basis R per edge. Forces need input gradients only: the
    backward of a Linear is one product (dX = dY W, no weight gradient), 1x its forward (FlopCounterMode
    agrees), the elementwise backward ~2x its forward; so E+F = 2 x Linear + 3 x elementwise.
    The radial filter depends on |r_ij| only, the same for both edges of a pair i -> j, j -> i (the neighbor lists
    hold both), so the least work runs it once per pair (as the TVM routes do, nn.ops.pairs): the floor's count.
    `forward_linear_per_edge` runs it per edge, as the eager model does (torch's count)."""
    F, L, R = cfg["channels"], cfg["layers"], cfg["n_rbf"]
    filter_lin, atom_lin = R * F + 3 * F * F, 18 * F * F
    atom_part = L * atoms * atom_lin + atoms * (F * F + F)
    lin = L * (edges // 2) * filter_lin + atom_part
    elem = L * (edges * 23 * F + atoms * 12 * F) + edges * R
    edge_part = L * (edges // 2) * filter_lin + L * edges * 23 * F
    return {"forward_linear": int(lin), "forward_elementwise": int(elem), "forward": int(lin + elem),
            "energy_forces": int(2 * lin + 3 * elem), "edge_share": edge_part / (lin + elem),
            "forward_linear_per_edge": int(L * edges * filter_lin + atom_part)}


def counted_linear_macs(model_spec: str, molecules: list) -> dict:
    """Matrix-product MACs of one eager pass, counted by torch's FlopCounterMode (forward; forward+backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ...graph.molecules import MoleculeSet
    from ...nn.batch import make_batch
    from ...nn.checkpoint import load_model

    model = load_model(model_spec)
    mols = MoleculeSet.from_molecules(molecules)
    b = make_batch(mols, range(len(mols)), model.cfg.species, model.cfg.cutoff)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model(b.species, b.pos, b.mol, b.src, b.dst, b.n_mol)
    for prm in model.parameters():  # count dE/dpos only, not weight gradients
        prm.requires_grad_(False)
    pos = b.pos.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as both:  # (autograd.grad inside the mode is not supported)
        model(b.species, pos, b.mol, b.src, b.dst, b.n_mol).sum().backward()
    return {"forward": fwd.get_total_flops() // 2, "energy_forces": both.get_total_flops() // 2}


def workload_macs(model_spec: str, wl: dict, mols: list) -> dict:
    """The analytic count of a workload (empty when its inputs could not be built) and torch's count."""
    from ...nn.checkpoint import load_payload

    if wl.get("edges") is None:
        return {}
    out = mac_count(load_payload(model_spec)["config"], wl["atoms"], wl["edges"])
    try:
        out["counted_linear"] = counted_linear_macs(model_spec, mols)
    except Exception as e:  # informational
        out["counted_linear"] = {"error": str(e)}
    return out


# ---------------------------------------------------------------- the physical limit
def peaks(cpu: dict, cores: int) -> dict:
    ghz = (cpu.get("mhz") or 2000.0) / 1e3
    flags = set(cpu.get("flags", []))
    avx512, vnni, avx2 = "avx512f" in flags, "avx512_vnni" in flags, "avx2" in flags
    fp32 = MAC_PER_CYCLE["fp32"] if avx512 else MAC_PER_CYCLE_AVX2["fp32"]
    int8 = MAC_PER_CYCLE["int8"] if vnni else MAC_PER_CYCLE_AVX2["int8"] if avx2 else None
    return {"cores": cores, "ghz": ghz, "clock_source": "/proc/cpuinfo 'cpu MHz'" if cpu.get("mhz") else "assumed 2.0 GHz",
            "fp32_gmac_s": cores * ghz * fp32, "int8_gmac_s": cores * ghz * int8 if int8 else None,
            "fp32_how": f"{'AVX-512' if avx512 else 'AVX2'} FMA, {fp32} MAC/cycle (2 FMA ports × {fp32 // 2} lanes)",
            "int8_how": ("AVX-512 VNNI vpdpbusd, 128 MAC/cycle (64 per instruction, 2 ports)" if vnni else
                         "AVX2 vpmaddubsw, 64 MAC/cycle (32 byte pairs per instruction, 2 ports; our kernels also spend a "
                         "vpsignb pair and a vpmaddwd per vpmaddubsw)" if avx2 else None)}


def floor_ms(macs: dict, mode: str, int8: bool, pk: dict) -> float:
    lin = macs["forward_linear"] * (2 if mode == "E+F" else 1)
    elem = macs["forward_elementwise"] * (3 if mode == "E+F" else 1)
    fp32 = pk["fp32_gmac_s"] * 1e9
    if int8 and pk.get("int8_gmac_s"):
        return (lin / (pk["int8_gmac_s"] * 1e9) + elem / fp32) * 1e3
    return (lin + elem) / fp32 * 1e3


def physical_limit(result: dict, cfg: BenchConfig) -> dict:
    cpu = result["environment"]["cpu"]
    pk = peaks(cpu, max(cfg.threads))
    rows = []
    for e in result["results"]:
        macs = result["macs"].get(e["workload"])
        if "median_ms" not in e or not macs:
            continue
        fl = floor_ms(macs, e["mode"], e["route"] in INT8_ROUTES, pk)
        row = {k: e[k] for k in ("threads", "workload", "mode", "route", "median_ms")}
        row.update(floor_ms=fl, fraction_of_peak=fl / e["median_ms"] * (max(cfg.threads) / e["threads"]))
        if e.get("ops_per_call"):
            row["us_per_op"] = e["median_ms"] * 1e3 / e["ops_per_call"]
            row["ops_per_call"] = e["ops_per_call"]
        rows.append(row)
    return {"peaks": pk, "rows": rows}
