"""Target presets (targets/*.json), resolved in a logged order: preset name or alias -> TVM tag -> raw JSON."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field

from ..errors import QSO3Error
from ..resources import targets_dir
from ..runtime.compiled import host_cpu_features


@dataclass
class TargetSpec:
    name: str
    target: dict  # TVM target JSON
    source: str  # "preset", "tag" or "json"
    description: str = ""
    arch: str = "x86_64"
    cpu_features: list[str] = field(default_factory=list)
    cross_compiler: str | None = None
    qemu_cpu: str | None = None
    device: str = "cpu"
    runs_locally: bool = False

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    @property
    def local(self) -> bool:
        """Can this machine run the artifact (same ISA, CPU device, CPU features present)?"""
        if self.device != "cpu" or self.arch != platform.machine():
            return False
        return set(self.cpu_features) <= host_cpu_features()


def presets() -> dict[str, TargetSpec]:
    out = {}
    for path in sorted(targets_dir().glob("*.json")):
        d = json.loads(path.read_text())
        spec = TargetSpec(name=path.stem, target=d["target"], source="preset", description=d.get("description", ""),
                          arch=d.get("arch", "x86_64"), cpu_features=d.get("cpu_features", []),
                          cross_compiler=d.get("cross_compiler"), qemu_cpu=d.get("qemu_cpu"),
                          device=d.get("device", "cpu"), runs_locally=d.get("runs_locally", False))
        out[path.stem] = spec
        for alias in d.get("aliases", []):
            out[alias] = spec
    return out


def _from_target(name: str, target, source: str) -> TargetSpec:
    d = json.loads(str(target))  # a Target prints as JSON
    host = d.get("host") or d
    arch = "aarch64" if "aarch64" in str(host.get("mtriple", "")) else "x86_64"
    return TargetSpec(name=name, target=d, source=source, arch=arch,
                      cross_compiler="aarch64-linux-gnu-g++" if arch == "aarch64" else None,
                      device="cuda" if d["kind"] == "cuda" else "cpu")


HOST = "host"  # the default target: the fastest preset this machine runs
HOST_ORDER = ("x86-avx512", "x86-avx2", "x86-64", "arm64-cortex-a76", "arm64-cortex-a72")


def host_preset() -> str:
    """The first preset of HOST_ORDER that runs on this machine (its instruction set and CPU features)."""
    table = presets()
    for name in HOST_ORDER:
        if name in table and table[name].local:
            return name
    raise QSO3Error(f"no target preset runs on this machine ({platform.machine()}): name one with --target")


def resolve_target(spec: str) -> TargetSpec:
    """A preset name/alias, `host` (host_preset), a TVM tag (e.g. nvidia/jetson-agx-orin-64gb), or a JSON target dict."""
    import tvm

    table = presets()
    if spec == HOST:
        spec = host_preset()
    if spec in table:
        return table[spec]
    if spec.lstrip().startswith("{"):
        try:
            return _from_target("custom", tvm.target.Target(json.loads(spec)), "json")
        except Exception as e:
            raise QSO3Error(f"invalid JSON target {spec!r}: {e}") from None
    try:
        return _from_target(spec, tvm.target.Target(spec), "tag")
    except Exception:
        raise QSO3Error(f"unknown target {spec!r}: use a preset ({', '.join(sorted(table))}), "
                        "a TVM tag, or a JSON target like '{\"kind\": \"llvm\", \"mcpu\": \"x86-64\"}'") from None


def tuning_target(spec):
    """The TVM target with num-cores (MetaSchedule needs it)."""
    import tvm

    d = dict(spec.target)
    host = d.get("host") if d.get("kind") == "cuda" else None
    if host is None and "num-cores" not in d:
        d["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(d)
