"""How many CUDA kernels (`__global__` functions) the tiny test model's energy+forces module holds
(reports/cuda.md). Run: python reports/cuda/count_kernels.py"""
import re

import torch

from qso3_tvm.compiler.compile import build
from qso3_tvm.compiler.targets import resolve_target
from qso3_tvm.nn.testing import tiny_model

ex = build(tiny_model(dtype=torch.float32), resolve_target("cuda-sm90"))
sources = [m.inspect_source() for m in ex.mod._collect_from_import_tree(lambda m: m.kind == "cuda")]
# each kernel is declared once and defined once; count the definitions
print(sum(len(re.findall(r"__global__ [^;{]*\{", src)) for src in sources), "kernels")
