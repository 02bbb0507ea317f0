"""The benchmark's routes: the one table every other module reads (names are written only here).

A route is an engine (PyTorch, ONNX Runtime, TVM) running one checkpoint at one precision. Routes
with an artifact (an ONNX graph, a compiled TVM library) are prepared in a subprocess and cached;
the others load their checkpoint directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    name: str
    description: str
    engine: str  # "torch", "ort" or "tvm": which worker engine serves it
    precision: str  # "fp32" or "int8": the arithmetic (which floor of the physical limit applies)
    checkpoint: str = "model_fp32"  # the BenchConfig field naming the checkpoint it starts from
    default: bool = True  # in the default selection
    reference: bool = False  # the route the others are compared with (speed-up, dE, dF)
    torch_compile: bool = False  # torch engine: torch.compile instead of eager
    tuned: bool = False  # tvm engine: compiled with tuning records
    artifact_option: str | None = None  # the BenchConfig field (and CLI flag) giving a prebuilt artifact

    @property
    def needs_artifact(self) -> bool:
        """An ONNX graph or a compiled library, made (and cached) in a preparation subprocess."""
        return self.engine != "torch"

    @property
    def int8(self) -> bool:
        return self.precision == "int8"


ROUTE_TABLE = (
    Route("eager-fp32", "PyTorch eager, fp32 checkpoint (the reference route)", "torch", "fp32", reference=True),
    Route("eager-int8", "PyTorch eager, int8 checkpoint in deployment form (nn.int8: torch._int_mm GEMMs)",
          "torch", "int8", checkpoint="model_int8", default=False),
    Route("compile-fp32", "torch.compile (inductor, dynamic shapes), fp32, dense one-hot readout", "torch", "fp32",
          torch_compile=True),
    Route("ort-fp32", "ONNX Runtime, fp32 graph (torch.onnx dynamo exporter)", "ort", "fp32"),
    Route("ort-int8", "ONNX Runtime, quantize_dynamic int8 of the fp32 graph (int8 weights, dynamic u8 activations; "
                      "not the QAT model)", "ort", "int8"),
    Route("tvm-fp32", "TVM, fp32 checkpoint compiled for the target", "tvm", "fp32", artifact_option="tvm_fp32"),
    Route("tvm-int8", "TVM, int8 QAT checkpoint compiled for the target (untuned)", "tvm", "int8",
          checkpoint="model_int8", artifact_option="tvm_int8"),
    Route("tvm-int8-tuned", "TVM, int8 QAT checkpoint compiled with tuning records", "tvm", "int8",
          checkpoint="model_int8", tuned=True, artifact_option="tvm_int8_tuned"),
)
ROUTES = {r.name: r for r in ROUTE_TABLE}
DEFAULT_WORKLOADS = ("ethanol-b1", "aspirin-b1", "qm9-b32", "qm9-b256")  # one molecule to ~4,700 atoms
DEFAULT_ROUTES = tuple(r.name for r in ROUTE_TABLE if r.default)
INT8_ROUTES = tuple(r.name for r in ROUTE_TABLE if r.int8)
REFERENCE_ROUTE = next(r.name for r in ROUTE_TABLE if r.reference)
# the modes every route is timed in: energy only, energy and forces
MODES = ("E", "E+F")
