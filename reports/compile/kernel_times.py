"""Single-kernel times of the hot kernels on one 32-QM9-molecule call (9,640 edge rows, 588 atoms), 1 thread:
the radial filter's second Linear forward (64 -> 192, SiLU folded) and its backward product (192 -> 64, SiLU'),
(on AVX2 also as two int8 code vectors, the form it replaced), residual_norms, and the messages forward and
backward with edges grouped by receiver and shuffled.
Usage: TVM_NUM_THREADS=1 python reports/compile/kernel_times.py [TARGET]   (default x86-avx2)"""
import sys
import time

import numpy as np
import tvm

from qso3_tvm.compiler.kernels import int8_matmul as im
from qso3_tvm.compiler.kernels import messages, update
from qso3_tvm.compiler.targets import resolve_target

target = resolve_target(sys.argv[1] if len(sys.argv) > 1 else "x86-avx2").tvm_target()
kern = im.dot_kernel(target)
rng = np.random.default_rng(0)
M, N, E, F, H = 9640, 588, 9640, 64, 4


def best_ms(func, arrays, repeats=15, calls=5):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            lib(*args)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return min(times)


w = rng.integers(-127, 128, (F, 3 * F)).astype(np.int8)
s_w = (rng.random(3 * F) * 0.01 + 1e-3).astype(np.float32)
x = rng.standard_normal((M, F)).astype(np.float32)
fwd = [x, *im.linear_weights(w, 0.013, s_w, np.zeros(3 * F, np.float32), 0, kern), np.zeros((M, 3 * F), np.float32)]
print(f"filter Linear 64->192 + SiLU, forward ({im.dot_kernel(target).name if kern else 'generic'}): "
      f"{best_ms(im.linear_func(F, 3 * F, kern, -127, 127, 0, silu=True), fwd):.2f} ms")
packed, corr = im.grad_product_weights(w, kern)
bwd = [rng.standard_normal((M, 3 * F)).astype(np.float32), s_w, packed, corr, x, np.array([0.013], np.float32),
       np.zeros((M, corr.shape[0]), np.float32)]
print(f"filter backward product 192->64 + SiLU' ({im.grad_kernel(kern).name if kern else 'generic'}): "
      f"{best_ms(im.grad_product_func(3 * F, F, kern, -127, 127, True), bwd):.2f} ms")
if kern is not None and im.grad_kernel(kern) != kern:  # the same product as two int8 code vectors, for comparison
    im.grad_kernel = lambda k: k
    packed, corr = im.grad_product_weights(w, kern)
    bwd[2:4] = packed, corr
    print(f"  as two int8 code vectors ({kern.name}): {best_ms(im.grad_product_func(3 * F, F, kern, -127, 127, True), bwd):.2f} ms")
norms = [rng.standard_normal(sh).astype(np.float32) for sh in ((N, F), (N, 3, F), (F, 2 * F))]
norms += [np.zeros(sh, np.float32) for sh in ((N, 2 * F), (N, F), (N, 3, F), (N, 3, 2 * F))]
print(f"residual_norms ({N} atoms): {best_ms(update.residual_norms_func(F), norms):.3f} ms")
dst = np.sort(rng.integers(0, N, E))
src = rng.integers(0, N, E)
for name, order in (("grouped by receiver", np.arange(E)), ("shuffled", rng.permutation(E))):
    arrays = [rng.uniform(size=(E, H)), rng.normal(size=(E, 3 * F)), rng.normal(size=(N, 2 * F)), rng.normal(size=(N, F)),
              rng.normal(size=(N, 3, F)), rng.normal(size=(F, F)) / 8, rng.normal(size=(E, 3))]
    arrays = [a.astype(np.float32) for a in arrays]
    for i in (0, 1, 6):
        arrays[i] = arrays[i][order]
    arrays += [src[order], dst[order], np.zeros((N, F), np.float32), np.zeros((N, 3, F), np.float32)]
    print(f"messages forward, edges {name}: {best_ms(messages.forward_func(F, H), arrays):.3f} ms")
    grads = [rng.normal(size=(N, F)).astype(np.float32), rng.normal(size=(N, 3, F)).astype(np.float32)]
    w = arrays[5]
    outs = [np.zeros(sh, np.float32) for sh in ((E, H), (E, 3 * F), (N, 2 * F), (N, 3, F), (E, 3))]
    backward = grads + [arrays[0], arrays[1], arrays[2], arrays[4], w, np.ascontiguousarray(w.T), arrays[6], *arrays[7:9]] + outs
    print(f"messages backward, edges {name}: {best_ms(messages.backward_func(F, H), backward):.3f} ms")
