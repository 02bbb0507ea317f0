"""Hand-written TIR kernels and schedules, per target (the tuner starts from these).

- int8_matmul: int8 x int8 -> int32 products on x86 VNNI (vpdpbusd), ARM dot product (sdot),
  ARM NEON (smull/sadalp), with weights packed at compile time.
- schedule: default CPU schedules for the fused kernels nobody wrote by hand.
- mddq, attention: custom operators of the quantized model (see their docstrings).
- messages, update, geometry: a layer's messages and neighbor sums, its update around the MLP, and the edge
  geometry, forward and backward (every CPU build, fp32 included).
"""
