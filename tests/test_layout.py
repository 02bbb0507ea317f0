"""The package layout: stages import in one direction only, and the runtime runs without torch or the compiler.

Stages (qso3_tvm/<stage>/) and what each may import besides itself and the core modules
(errors, files, resources):

    graph     numpy, scipy: molecules, neighbor lists, the artifact's calling convention and manifest
    runtime   graph (+ TVM runtime): local and remote CompiledModel, the ASE calculator
    nn        graph (+ torch): model, quantization, training, metrics, torch halves of the custom ops
    compiler  graph, nn, runtime (+ TVM compiler): export, Relax import, kernels, targets, tuning
    boards    graph, runtime: firmware control, serial console, profiling on boards
    apps      every stage: evaluate, demo, MD, bench, experiments
    cli       everything (a thin layer over the stages)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import qso3_tvm

PACKAGE = Path(qso3_tvm.__file__).parent
CORE = {"errors", "files", "resources", "__init__"}
ALLOWED = {
    "graph": set(),
    "runtime": {"graph"},
    "nn": {"graph"},
    "compiler": {"graph", "nn", "runtime"},
    "boards": {"graph", "runtime"},
    "apps": {"graph", "runtime", "nn", "compiler", "boards"},
    "cli": {"graph", "runtime", "nn", "compiler", "boards", "apps"},
}
THIRD_PARTY_FORBIDDEN = {"graph": {"torch", "tvm", "e3nn"}, "runtime": {"torch", "e3nn"}, "nn": {"tvm"}}


def stage_of(module: str) -> str:
    """'qso3_tvm.nn.model' -> 'nn'; core modules are their own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions, as absolute names."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            if not node.module:  # from . import x
                out |= {f"{name}.{a.name}" for a in node.names}
    return out


def stage_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = stage_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for imp in imports_of(path):
            top = imp.split(".")[0]
            dst = stage_of(imp) if top == "qso3_tvm" else top
            if dst != src:
                edges.setdefault((src, dst), []).append(str(path.relative_to(PACKAGE)))
    return edges


def test_stages_import_in_one_direction():
    bad = []
    for (src, dst), files in stage_edges().items():
        if src in CORE or src not in ALLOWED:
            continue
        if dst in ALLOWED and dst not in ALLOWED[src]:
            bad.append(f"{src} -> {dst} ({', '.join(sorted(set(files)))})")
        if dst in THIRD_PARTY_FORBIDDEN.get(src, ()):
            bad.append(f"{src} imports {dst} ({', '.join(sorted(set(files)))})")
    assert not bad, "imports against the stage direction:\n" + "\n".join(bad)


def test_core_modules_import_no_stage():
    bad = [f"{src} -> {dst}" for (src, dst), _ in stage_edges().items() if src in CORE and dst in ALLOWED]
    assert not bad, bad


def test_no_import_circle_between_stages():
    graph: dict[str, set[str]] = {}
    for (src, dst), _ in stage_edges().items():
        if src in ALLOWED and dst in ALLOWED:
            graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    circles = [s for s in graph if reaches(s, s, {s})]
    assert not circles, f"stages in an import circle: {circles}"


def test_checker_sees_violations(tmp_path):
    """The checker itself: a relative import inside a function is resolved to its stage."""
    pkg = tmp_path / "qso3_tvm" / "runtime"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..nn.model import So3krates\n    from . import compiled\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "qso3_tvm"
    try:
        assert imports_of(pkg / "x.py") == {"qso3_tvm.nn.model", "qso3_tvm.runtime", "qso3_tvm.runtime.compiled"}
    finally:
        PACKAGE = saved


RUNTIME_WITHOUT_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "e3nn"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    from pathlib import Path
    import numpy as np
    from qso3_tvm.runtime.compiled import CompiledModel
    from qso3_tvm.runtime.remote import RemoteModel, connect
    from qso3_tvm.graph.convention import call_arrays, sample_set
    mols, names = sample_set((1, 6, 8))
    arrays, padded = call_arrays(mols, [0], (1, 6, 8), 5.0)
    assert [a.dtype.name for a in arrays] == ["int64", "float32", "int64", "int64", "int64", "float32"]
    try:
        import ase  # noqa: F401
    except ImportError:
        pass
    else:
        from qso3_tvm.runtime.calculator import QSO3Calculator  # noqa: F401
    loaded = sorted(m for m in sys.modules if m.startswith(("qso3_tvm.compiler", "qso3_tvm.nn", "torch")))
    print("LOADED", loaded)
""")


def test_runtime_imports_without_torch_and_loads_no_compiler():
    proc = subprocess.run([sys.executable, "-c", RUNTIME_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout
