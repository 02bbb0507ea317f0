"""Hand-written TIR kernels against numpy, the instructions they must emit per target, the default
CPU schedule's numerics, and the TVM bug that tvm_fixes works around."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from qso3_tvm.compiler.kernels.int8_matmul import dot_kernel, linear_func, linear_weights
from qso3_tvm.compiler.kernels.pipeline import relax_pipeline
from qso3_tvm.compiler.targets import resolve_target

X86_VNNI = resolve_target("x86-avx512")
RNG = np.random.default_rng(0)


def asm_of(mod, target) -> str:
    return tvm.compile(mod, target=target).mod.inspect_source("asm")


@pytest.mark.parametrize("preset, instr", [("x86-avx512", "vpdpbusd"), ("x86-avx2", "vpmaddubsw"), ("x86-64", None), ("arm64-cortex-a76", "sdot"),
                                           ("arm64-cortex-a72", "smull")])
@pytest.mark.parametrize("k, n, bounds, silu", [(20, 64, (0, 255, 128), False), (64, 192, (-127, 127, 0), False),
                                                (64, 1, (-127, 127, 0), False), (64, 192, (-127, 127, 0), True)])
def test_int8_linear_kernel_matches_torch(preset, instr, k, n, bounds, silu):
    """The fused int8 Linear (codes, product, scale and bias) against nn.int8.int8_linear: unsigned codes
    (the radial basis) and signed ones, one output column (padding to the instruction's block), any row count,
    and with the MLP's SiLU folded in (fast exp in the kernel: a code may differ by one where SiLU(x)/s_x lies
    within float rounding of a rounding boundary)."""
    from qso3_tvm.nn.int8 import int8_linear

    spec = resolve_target(preset)
    target = spec.tvm_target()
    kern = dot_kernel(target)
    lib = tvm.compile(tvm.IRModule({"main": linear_func(k, n, kern, *bounds, silu=silu)}), target=target)
    asm = lib.mod.inspect_source("asm")
    if instr:
        assert instr in asm
    if instr == "smull":
        assert "sdot" not in asm  # a Pi 4 has no dot product: the artifact must not use it
    if not spec.local:
        pytest.skip(f"{preset} does not run here")
    for m in (2, 37):  # symbolic rows
        x = (RNG.standard_normal((m, k)) * 2).astype(np.float32)
        x[0, 0] = 1e3  # clipped to the largest code
        s_x = 0.013
        w = RNG.integers(-127, 128, (k, n)).astype(np.int8)
        s_w, b = (RNG.random(n) * 0.01 + 1e-3).astype(np.float32), RNG.standard_normal(n).astype(np.float32)
        consts = linear_weights(w, s_x, s_w, b, bounds[2], kern)
        out = tvm.runtime.tensor(np.full((m, consts[-1].shape[0]), np.nan, np.float32))
        lib(tvm.runtime.tensor(x), *map(tvm.runtime.tensor, consts), out)
        ref = int8_linear(torch.from_numpy(x), torch.from_numpy(w), torch.tensor(s_x, dtype=torch.float32),
                          torch.from_numpy(s_w), torch.from_numpy(b), *bounds, silu=silu).numpy()
        # LLVM may fuse the scale and bias into one multiply-add where torch rounds twice
        np.testing.assert_allclose(out.numpy()[:, :n], ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("preset, instr", [("x86-avx512", "vpdpbusd"), ("x86-avx2", "vpmaddubsw"), ("x86-64", None), ("arm64-cortex-a76", "sdot"),
                                           ("arm64-cortex-a72", "smull")])
def test_int8_qkv_kernel_matches_three_linears(preset, instr):
    """The fused q, k, value kernel (one input, three steps, four weight segments) against three nn.int8.int8_linear,
    and the input passed on unchanged."""
    from qso3_tvm.compiler.kernels.int8_matmul import qkv_linear_func, qkv_weights
    from qso3_tvm.nn.int8 import int8_linear

    spec = resolve_target(preset)
    target = spec.tvm_target()
    kern = dot_kernel(target)
    k, F, m = 64, 64, 37
    lib = tvm.compile(tvm.IRModule({"main": qkv_linear_func(k, F, kern, -127, 127, 0)}), target=target)
    if instr:
        assert instr in lib.mod.inspect_source("asm")
    if not spec.local:
        pytest.skip(f"{preset} does not run here")
    x = (RNG.standard_normal((m, k)) * 2).astype(np.float32)
    linears = [(RNG.integers(-127, 128, (k, n)).astype(np.int8), float(RNG.random() * 0.02 + 0.005),
                (RNG.random(n) * 0.01 + 1e-3).astype(np.float32), RNG.standard_normal(n).astype(np.float32)) for n in (F, F, 2 * F)]
    outs = [tvm.runtime.tensor(np.full((m, n), np.nan, np.float32)) for n in (F, F, 2 * F, k)]
    lib(tvm.runtime.tensor(x), *map(tvm.runtime.tensor, qkv_weights(linears, 0, kern)), *outs)
    t = torch.from_numpy
    for out, (w, s_x, s_w, b) in zip(outs, linears):
        ref = int8_linear(t(x), t(w), torch.tensor(s_x, dtype=torch.float32), t(s_w), t(b), -127, 127, 0).numpy()
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert np.array_equal(outs[3].numpy(), x)


# the backward products: on AVX2 one int16 code per gradient element on vpmaddwd (kernels.int8_matmul.grad_kernel)
GRAD_INSTR = [("x86-avx512", "vpdpbusd"), ("x86-avx2", "vpmaddwd"), ("x86-64", None), ("arm64-cortex-a76", "sdot"),
              ("arm64-cortex-a72", "smull")]


def assert_grad_instr(asm: str, preset: str, instr: str | None) -> None:
    if instr:
        assert instr in asm
    if preset == "x86-avx2":
        assert "vpmaddubsw" not in asm  # the int16 form, not two int8 products


@pytest.mark.parametrize("preset, instr", GRAD_INSTR)
def test_int8_qkv_grad_kernel_matches_torch(preset, instr):
    """The fused backward of q, k, value (three row steps, value's two segments, three straight-through masks, plus the
    gradient of the passed-on input) against nn.ops.int8_linear.int8_qkv_grad_op."""
    from qso3_tvm.compiler.kernels.int8_matmul import qkv_grad_func, qkv_grad_weights
    from qso3_tvm.nn.ops.int8_linear import int8_qkv_grad_op

    spec = resolve_target(preset)
    target = spec.tvm_target()
    kern = dot_kernel(target)
    k, F, m = 64, 64, 37
    lib = tvm.compile(tvm.IRModule({"main": qkv_grad_func(k, F, kern, -127, 127)}), target=target)
    assert_grad_instr(lib.mod.inspect_source("asm"), preset, instr)
    if not spec.local:
        pytest.skip(f"{preset} does not run here")
    grads = [RNG.standard_normal((m, n)).astype(np.float32) for n in (F, F, 2 * F, k)]
    grads[1][4] = 0  # a row with no gradient through k
    x = (RNG.standard_normal((m, k)) * 2).astype(np.float32)
    w = [RNG.integers(-127, 128, (k, n)).astype(np.int8) for n in (F, F, 2 * F)]
    s_w = [(RNG.random(n) * 0.01 + 1e-3).astype(np.float32) for n in (F, F, 2 * F)]
    s_x = [0.013, 0.02, 0.031]  # |x / s_x| > 127 often: the three masks differ
    out = tvm.runtime.tensor(np.full((m, k), np.nan, np.float32))
    lib(*map(tvm.runtime.tensor, grads + [x]), *map(tvm.runtime.tensor, qkv_grad_weights(w, s_w, kern)),
        tvm.runtime.tensor(np.array(s_x, np.float32)), out)
    t = torch.from_numpy
    ref = int8_qkv_grad_op(*map(t, grads + [x] + w), *(torch.tensor(s, dtype=torch.float32) for s in s_x), *map(t, s_w),
                           -127, 127).numpy()
    # LLVM may fuse a multiply-add where torch rounds twice: a low code can differ by one (1/254 of a step)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_stock_vnni_intrinsic_still_broken():
    """TVM 0.27 bug worked around in qso3_tvm.compiler.tvm_fixes: tensorizing with the stock dot_16x4_vnni
    intrinsic fails to build (LLVM 22 takes <64 x i8> operands). When this test fails, TVM fixed it."""
    from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN

    from qso3_tvm.compiler.kernels.int8_matmul import DotKernel

    stock = DotKernel("stock", VNNI_DOT_16x4_INTRIN, 16, "uint8")
    with pytest.raises(Exception):
        tvm.compile(tvm.IRModule({"main": linear_func(64, 64, stock, -127, 127, 0)}), target=X86_VNNI.tvm_target())


def test_default_cpu_schedule_keeps_float_numerics():
    """Matmul + elementwise epilogue, scheduled by our default rule vs numpy (float32)."""
    target = resolve_target("x86-64").tvm_target()
    w = RNG.normal(size=(20, 64)).astype(np.float32)
    bb = relax.BlockBuilder()
    e = tvm.tirx.Var("e", "int64")
    x = relax.Var("x", relax.TensorType([e, 20], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.nn.silu(relax.op.multiply(y, relax.const(0.5, "float32"))))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xs = RNG.normal(size=(13, 20)).astype(np.float32)
    ref = torch.nn.functional.silu(torch.from_numpy(xs @ w * 0.5)).numpy()
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xs)).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [128, 20])
def test_default_cpu_schedule_vectorizes_reductions(width):
    """A matmul with symbolic rows gets its output-channel loop vectorized. The rule used to vectorize
    after decompose_reduction, which TVM refuses on the update block; the error was swallowed and every
    matmul ran as scalar loops (0.8 ms instead of 8 µs for 69x64x128 on AVX-512). Widths that 16 does
    not divide (the gradient of 20 radial basis functions) used to stay scalar; they get 4-lane vectors
    (9640x64x20: 1.43 ms scalar, 1.43 ms as one 20-lane vector, which LLVM scalarizes, 0.63 ms as 4 lanes)."""
    from tvm import te

    from qso3_tvm.compiler.kernels.schedule import CPUDefault

    n = tvm.tirx.Var("n", "int64")
    a, b = te.placeholder((n * 3, 64), "float32", "a"), te.placeholder((64, width), "float32", "b")
    k = te.reduce_axis((0, 64), "k")
    c = te.compute((n * 3, width), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")
    sch = CPUDefault().apply(te.create_prim_func([a, b, c, n]), resolve_target("x86-avx512").tvm_target(), False)
    update = sch.get_sblock("matmul_update")
    kinds = [sch.get(lp).kind for lp in sch.get_loops(update)]
    assert kinds[-1] == tvm.tirx.ForKind.VECTORIZED


def test_default_cpu_schedule_never_unrolls_a_long_loop():
    """A static loop over edges whose count 16 does not divide gets 8-lane vectors, not unrolled: unrolling
    76,808 edges by 8 made one compile take 8 GB and tens of minutes in LLVM."""
    from tvm import te

    from qso3_tvm.compiler.kernels.schedule import CPUDefault

    x = te.placeholder((76808,), "float32", "x")
    y = te.compute((76808,), lambda i: x[i] * 2.0, name="scale")
    sch = CPUDefault().apply(te.create_prim_func([x, y]), resolve_target("x86-avx512").tvm_target(), False)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("scale"))]
    assert loops[-1].kind == tvm.tirx.ForKind.VECTORIZED and int(loops[-1].extent) == 8
    assert all(lp.kind != tvm.tirx.ForKind.UNROLLED for lp in loops)


def test_exp_and_sigmoid_are_vectorized_fast_exp_on_cpu():
    """CPU builds legalize exp and sigmoid to TOPI's fast_exp (kernels.fast_math): no per-element libm
    expf call, and the values of float64 numpy to float32 rounding."""
    target = resolve_target("host").tvm_target()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("e", "int64"), 64], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.sigmoid(x), relax.op.exp(relax.op.multiply(x, relax.const(0.25, "float32")))))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target))
    assert "expf" not in ex.mod.imports[0].inspect_source("asm")  # the stock lowering calls expf 64 times here
    xs = (RNG.normal(size=(37, 64)) * 8).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    x64 = xs.astype(np.float64)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-x64)) + np.exp(0.25 * x64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_scatter_rows_kernel_matches_numpy(accumulate, dtype):
    from qso3_tvm.compiler.kernels.scatter import scatter_rows_func

    func = scatter_rows_func(48, dtype, "int64", accumulate)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=resolve_target("x86-64").tvm_target())
    data, values = (RNG.normal(size=s).astype(dtype) * 10 for s in ((7, 48), (11, 48)))
    index = RNG.permutation(np.arange(11) % 7) if accumulate else RNG.permutation(7)[:5]
    values = values[: len(index)]
    out = tvm.runtime.tensor(np.zeros_like(data))
    lib["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(index), tvm.runtime.tensor(values), out)
    ref = data.copy()
    if accumulate:
        np.add.at(ref, index, values)
    else:
        ref[index] = values
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("grid,ste,bits", [("cube", "grid", 8), ("sphere", "grid", 8), ("cube", "geometric", 8),
                                           ("sphere", "geometric", 8), ("cube", "grid", 16)])
def test_mddq_operator_equals_qat_module_and_its_ste_gradient(grid, ste, bits):
    """The deployed custom operator's forward and backward vs autograd of quant.MDDQ (float64)."""
    from qso3_tvm.nn.ops.mddq import MDDQKernel
    from qso3_tvm.nn.quant import MDDQ

    torch.manual_seed(0)
    q = MDDQ(16, 8, grid, ste, direction_bits=bits).double()
    v = torch.randn(9, 3, 16, dtype=torch.float64)
    v[0, :, 0] = 0.0  # zero vector: the ε guard
    v[1, :, 1] = torch.tensor([0.5, -0.5, 0.2], dtype=torch.float64)  # tied largest components
    q(v)  # calibrates the magnitude steps
    q.eval()
    g = torch.randn_like(v)
    grads = []
    for module in (q, MDDQKernel(q).double()):
        x = v.clone().requires_grad_(True)
        out = module(x)
        (out * g).sum().backward()
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cube,geometric,levels", [(True, False, 127), (False, False, 127), (True, True, 127), (True, False, 32767)])
def test_mddq_tir_kernels_match_torch_reference(cube, geometric, levels):
    from qso3_tvm.compiler.kernels import mddq

    target = resolve_target("x86-64").tvm_target()
    v = RNG.normal(size=(7, 3, 16)).astype(np.float32)
    v[0, :, 0] = 0.0
    g = RNG.normal(size=v.shape).astype(np.float32)
    step = np.full(16, 0.02, np.float32)
    fwd = tvm.compile(tvm.IRModule({"main": mddq.forward_func(16, 255, cube, levels=levels)}), target=target)
    bwd = tvm.compile(tvm.IRModule({"main": mddq.backward_func(16, 255, cube, geometric, levels)}), target=target)
    out, dv = (tvm.runtime.tensor(np.zeros_like(v)) for _ in range(2))
    fwd(tvm.runtime.tensor(v), tvm.runtime.tensor(step), out)
    bwd(tvm.runtime.tensor(g), tvm.runtime.tensor(v), tvm.runtime.tensor(step), dv)
    tv, tg, ts = (torch.from_numpy(a) for a in (v, g, step))
    ref_out = torch.ops.qso3.mddq(tv, ts, 255, cube, geometric, levels).numpy()
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=0, atol=1e-6)
    if levels != 127:  # the wider grid gives other outputs: the kernel follows its levels
        assert np.abs(ref_out - torch.ops.qso3.mddq(tv, ts, 255, cube, geometric).numpy()).max() > 1e-5
    ref = torch.ops.qso3.mddq_backward(tg, tv, ts, 255, cube, geometric, levels).numpy()
    np.testing.assert_allclose(dv.numpy(), ref, rtol=1e-5, atol=1e-5)


def _attention_case(dtype=np.float32, n=9, e=40, heads=4, dim=16):
    rng = np.random.default_rng(1)
    q, k = (rng.normal(size=(n, heads, dim)).astype(dtype) for _ in range(2))
    src, dst = rng.integers(0, n, e), rng.integers(0, n, e)
    return q, k, src, dst, rng.uniform(size=e).astype(dtype), np.array([4.0, 3.0, 5.0, 2.0], dtype)[:heads]


@pytest.mark.parametrize("levels", [127, 32767])
def test_attention_operator_equals_model_attention_and_its_ste_gradient(levels):
    """qso3.l2_attention (forward, backward) vs autograd through the QAT model's own attention."""
    from qso3_tvm.nn.model import InteractionLayer, ModelConfig
    from qso3_tvm.nn.ops.attention import L2AttentionKernel
    from qso3_tvm.nn.quant import FixedGrid

    layer = InteractionLayer(ModelConfig(channels=16, heads=2)).double()
    layer.hooks.query, layer.hooks.key = FixedGrid(levels), FixedGrid(levels)
    rng = np.random.default_rng(2)
    s = torch.tensor(rng.normal(size=(9, 16)), requires_grad=True)
    fc = torch.tensor(rng.uniform(size=40), requires_grad=True)
    src, dst = (torch.tensor(rng.integers(0, 9, 40)) for _ in range(2))
    g = torch.tensor(rng.normal(size=(40, 2)))
    results = []
    for fused in (None, L2AttentionKernel(levels)):
        layer.fused_attention = fused
        alpha = layer.attention_weights(layer.q(s), layer.k(s), src, dst, fc, 9)
        results.append((alpha.detach(), *torch.autograd.grad((alpha * g).sum(), (s, fc))))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,e,levels", [(9, 40, 127), (50, 2100, 127), (9, 40, 32767)])  # one thread; heads on the thread pool
def test_attention_tir_kernels_match_torch_reference(n, e, levels):
    """(32767 levels: int16 codes, products still exact in int32; torch's float32 products round, hence rtol)"""
    from qso3_tvm.compiler.kernels.attention import backward_func, forward_func

    target = resolve_target("x86-64").tvm_target()
    inputs = _attention_case(n=n, e=e)
    inputs[4][::7] = 0.0  # edges at the cutoff: no weight, and a gradient of fc all the same
    lib = tvm.compile(tvm.IRModule({"main": forward_func(4, 16, levels)}), target=target)
    out = tvm.runtime.tensor(np.zeros((e, 4), np.float32))
    lib(*(tvm.runtime.tensor(x) for x in inputs), out)
    ref = torch.ops.qso3.l2_attention(*(torch.from_numpy(x) for x in inputs), levels).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    if levels != 127:  # the finer grid moves the weights: the kernel follows its levels
        assert np.abs(ref - torch.ops.qso3.l2_attention(*(torch.from_numpy(x) for x in inputs)).numpy()).max() > 1e-5

    g_alpha = np.random.default_rng(6).normal(size=(e, 4)).astype(np.float32)
    args = [g_alpha, *inputs, ref]
    refs = [r.numpy() for r in torch.ops.qso3.l2_attention_backward(*(torch.from_numpy(x) for x in args), levels)]
    assert np.abs(refs[2][::7]).max() > 0
    lib = tvm.compile(tvm.IRModule({"main": backward_func(4, 16, levels)}), target=target)
    outs = [tvm.runtime.tensor(np.full(r.shape, np.nan, np.float32)) for r in refs]
    lib(*(tvm.runtime.tensor(x) for x in args), *outs)
    for got, want in zip(outs, refs):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _messages_case(dtype=np.float32, n=9, e=40, channels=16, heads=4, by_receiver=False):
    """α, φ (per pair of edges), val, s, v, W (vec_value's weight), u, src, dst, and the pairs pair, canon, partner
    (nn.ops.pairs) of e // 2 random pairs i -> j, j -> i (some repeated; atom 1 has no edges), the edges shuffled
    or grouped by receiver (the forward's per-receiver pass: receiver_segments finds the order)."""
    from qso3_tvm.nn.ops.pairs import edge_pairs

    rng = np.random.default_rng(3)
    alpha = rng.uniform(size=(e, heads))
    phi, val = rng.normal(size=(e // 2, 3 * channels)), rng.normal(size=(n, 2 * channels))
    s, v, w = rng.normal(size=(n, channels)), rng.normal(size=(n, 3, channels)), rng.normal(size=(channels, channels)) / 4
    u = rng.normal(size=(e, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    atoms = np.delete(np.arange(n), 1)
    i = rng.choice(atoms, e // 2)
    j = np.array([rng.choice(atoms[atoms != a]) for a in i])
    src, dst = np.concatenate([i, j]), np.concatenate([j, i])
    order = np.argsort(dst, kind="stable") if by_receiver else rng.permutation(e)
    src, dst = src[order], dst[order]
    pairs = [x.numpy() for x in edge_pairs(torch.from_numpy(src), torch.from_numpy(dst))]
    return [x.astype(dtype) for x in (alpha, phi, val, s, v, w, u)] + [src, dst, *pairs]


def test_messages_operator_equals_model_messages_and_their_gradient():
    """qso3.messages (forward, and its hand-written backward) vs autograd of model.residual_messages."""
    from qso3_tvm.nn.model import residual_messages
    from qso3_tvm.nn.ops.messages import MessagesKernel

    *floats, w, u, src, dst, pair, canon, partner = (torch.from_numpy(x) for x in _messages_case(np.float64))
    linear = torch.nn.Linear(16, 16, bias=False).double()
    linear.weight.data.copy_(w)
    rng = np.random.default_rng(4)
    g_s, g_v = torch.tensor(rng.normal(size=(9, 16))), torch.tensor(rng.normal(size=(9, 3, 16)))
    results = []
    for messages in (residual_messages, MessagesKernel()):
        xs = [x.clone().requires_grad_(True) for x in floats + [u]]
        s1, v1 = messages(*xs[:5], linear, xs[5], src, dst, (pair, canon, partner))
        results.append((s1.detach(), v1.detach(), *torch.autograd.grad((s1 * g_s).sum() + (v1 * g_v).sum(), xs)))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert all(t.abs().max() > 0 for t in results[0])


# one thread, or atoms / heads on the thread pool; edges in any order, or sorted by receiver (neighbor lists);
# 4 or 3 channels per head (lane sums by vector halving, or a chain)
@pytest.mark.parametrize("n, e, by_receiver, F", [(9, 40, False, 16), (9, 40, True, 16), (50, 2100, False, 16),
                                                  (50, 2100, True, 16), (9, 40, True, 12)])
def test_messages_tir_kernels_match_torch_reference(n, e, by_receiver, F):
    from qso3_tvm.compiler.kernels import messages

    assert (e >= messages.PARALLEL_MIN_EDGES) == (e > 40)
    target = resolve_target("x86-64").tvm_target()
    inputs = _messages_case(n=n, e=e, channels=F, by_receiver=by_receiver)
    alpha, phi, val, s, v, w, u, src, dst, pair, canon, partner = inputs
    wt = np.ascontiguousarray(w.T)
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=(n, F)).astype(np.float32), rng.normal(size=(n, 3, F)).astype(np.float32)]
    fwd = tvm.compile(tvm.IRModule({"main": messages.forward_func(F, 4)}), target=target)
    bwd = tvm.compile(tvm.IRModule({"main": messages.backward_func(F, 4)}), target=target)
    t = torch.from_numpy
    ref_fwd = torch.ops.qso3.messages(*map(t, inputs))
    ref_bwd = torch.ops.qso3.messages_backward(*map(t, grads + [alpha, phi, val, v, w, u, src, dst, pair, canon, partner]))
    cases = ((fwd, [alpha, phi, val, s, v, wt, u, src, dst, pair], ref_fwd),
             (bwd, grads + [alpha, phi, val, v, w, wt, u, src, dst, canon, partner], ref_bwd))
    for lib, args, refs in cases:
        outs = [tvm.runtime.tensor(np.full(r.shape, np.nan, np.float32)) for r in refs]
        lib(*(tvm.runtime.tensor(x) for x in args), *outs)
        for out, ref in zip(outs, refs):
            np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref.numpy()).max()))


@pytest.mark.parametrize("by_receiver", [True, False])
def test_edge_pairs_kernel_matches_torch_operator(by_receiver):
    """qso3.edge_pairs (each edge's pair; each pair's canonical edge and its reverse) from a neighbor list with repeated
    pairs (as bucket padding makes them), grouped by receiver or shuffled: TIR kernel == torch operator, and every
    pair is one edge i -> j, i < j, and one j -> i, each edge in exactly one pair."""
    from qso3_tvm.compiler.kernels.pairs import pairs_func
    from qso3_tvm.graph.convention import repeat_pair
    from qso3_tvm.graph.neighbors import radius_graph
    from qso3_tvm.nn.ops.pairs import edge_pairs

    rng = np.random.default_rng(7)
    src, dst = repeat_pair(*radius_graph(rng.normal(size=(30, 3)) * 2, 3.0), (4, 9), 3)
    if not by_receiver:
        order = rng.permutation(len(src))
        src, dst = src[order], dst[order]
    pair, canon, partner = (x.numpy() for x in edge_pairs(torch.from_numpy(src), torch.from_numpy(dst)))
    p = np.arange(len(src) // 2)
    assert len(canon) == len(partner) == len(p) and (src[canon] < dst[canon]).all()
    assert (src[partner] == dst[canon]).all() and (dst[partner] == src[canon]).all()
    assert (np.sort(np.concatenate([canon, partner])) == np.arange(len(src))).all()
    assert (pair[canon] == p).all() and (pair[partner] == p).all()
    lib = tvm.compile(tvm.IRModule({"main": pairs_func()}), target=resolve_target("x86-64").tvm_target())
    outs = [tvm.runtime.tensor(np.full(n, -1, np.int64)) for n in (len(src), len(p), len(p))]
    lib(tvm.runtime.tensor(src), tvm.runtime.tensor(dst), *outs)
    for out, want in zip(outs, (pair, canon, partner)):
        np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("src, dst", [([0, 1, 1, 2], [1, 0, 2, 0]), ([0, 1, 2, 2], [1, 0, 2, 2]), ([0, 1, 0, 2], [1, 0, 1, 0])])
def test_edge_pairs_operator_refuses_edges_that_are_not_pairs(src, dst):
    """An edge without its reverse, a self-loop, a repeated edge whose reverse is not repeated."""
    from qso3_tvm.nn.ops.pairs import edge_pairs

    with pytest.raises(ValueError, match="pairs"):
        edge_pairs(torch.tensor(src), torch.tensor(dst))


def _update_case(dtype, n=9, channels=16, seed=6):
    rng = np.random.default_rng(seed)
    F = channels
    shapes = [(n, F), (n, 3, F), (2 * F, F), (n, 3 * F)]  # s, v, W, a
    return [rng.normal(size=sh).astype(dtype) for sh in shapes]


def test_update_operators_equal_model_update_and_their_gradient():
    """qso3.residual_norms and qso3.gated_update (forward, and their hand-written backwards) vs autograd of
    model.residual_norms and model.gated_update, chained through a nonlinear stand-in for the update MLP."""
    from qso3_tvm.nn.model import gated_update, residual_norms
    from qso3_tvm.nn.ops.update import UpdateKernels

    *inputs, w, a0 = (torch.from_numpy(x) for x in _update_case(np.float64))
    mix = torch.from_numpy(np.random.default_rng(7).normal(size=(32, 48)))
    linear = torch.nn.Linear(16, 32, bias=False).double()
    linear.weight.data.copy_(w)
    g = [torch.from_numpy(np.random.default_rng(8).normal(size=sh)) for sh in ((9, 16), (9, 3, 16))]
    results = []
    for norms, gate in ((residual_norms, gated_update), (UpdateKernels().residual_norms, UpdateKernels().gated_update)):
        xs = [t.clone().requires_grad_(True) for t in inputs + [a0]]
        x, s1, v1, uvvv = norms(*xs[:2], linear)
        s2, v2 = gate(torch.tanh(x @ mix) + xs[2], s1, v1, uvvv)
        results.append((s2.detach(), v2.detach(), *torch.autograd.grad((s2 * g[0]).sum() + (v2 * g[1]).sum(), xs)))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert all(t.abs().max() > 0 for t in results[0])


@pytest.mark.parametrize("n", [9, 5000])  # 5000 atoms: rows on the thread pool (parallel_rows at a static size)
def test_update_tir_kernels_match_torch_reference(n):
    from qso3_tvm.compiler.kernels import update
    from qso3_tvm.compiler.kernels.schedule import parallel_rows

    target = resolve_target("x86-64").tvm_target()
    s, v, w, a = _update_case(np.float32, n=n)
    rng = np.random.default_rng(9)
    t = torch.from_numpy
    x, s1, v1, uvvv = (r.numpy() for r in torch.ops.qso3.residual_norms(t(s), t(v), t(w)))
    g_x, g_v1, g_u, g_s, g_v = (rng.normal(size=r.shape).astype(np.float32) for r in (x, v1, uvvv, s, v))
    cases = [(update.residual_norms_func(16), [s, v, np.ascontiguousarray(w.T)], [s, v, w], "residual_norms"),
             (update.residual_norms_backward_func(16), [g_x, g_s, g_v1, g_u, x, uvvv, w], None, "residual_norms_backward"),
             (update.gated_update_func(16), [a, s1, v1, uvvv], None, "gated_update"),
             (update.gated_update_backward_func(16), [g_s, g_v, a, uvvv], None, "gated_update_backward")]
    for func, args, torch_args, op in cases:
        refs = getattr(torch.ops.qso3, op)(*(t(x) for x in (torch_args or args)))
        mod = _row_kernel_call(func, args, refs)
        vm = tvm.relax.VirtualMachine(tvm.compile(parallel_rows(mod), target=target), tvm.cpu())
        outs = vm["main"](*(tvm.runtime.tensor(x) for x in args))
        for out, ref in zip(outs, refs):
            np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5 * np.abs(ref.numpy()).max())


def _row_kernel_call(func, args, refs):
    """A Relax module whose main calls `func` at the static shapes of `args` (so parallel_rows can apply)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(x.shape, str(x.dtype))) for i, x in enumerate(args)]
    with bb.function("main", params):
        gv = bb.add_func(func, func.attrs["global_symbol"])
        outs = [relax.TensorType(r.shape, "float32") for r in refs]
        out = bb.emit(relax.call_tir(gv, params, outs if len(outs) > 1 else outs[0]))
        bb.emit_func_output(out)
    return bb.get()


def _geometry_case(dtype, n=9, e=40, seed=10):
    """Positions, senders, receivers (no self edges) and upstream gradients; atom n - 1 is beyond the cutoff of the rest."""
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, 3)) * 1.5
    pos[-1] += 20.0
    src = rng.integers(0, n, e)
    dst = (src + 1 + rng.integers(0, n - 1, e)) % n
    grads = [rng.normal(size=s) for s in ((e, 3), (e,), (e, 20))]
    return pos.astype(dtype), src, dst, [g.astype(dtype) for g in grads]


def test_edge_geometry_operator_equals_model_geometry_and_its_gradient():
    """qso3.edge_geometry (forward, and its hand-written backward) vs autograd of model.edge_geometry, edges beyond
    the cutoff (clamped envelope) included."""
    from qso3_tvm.nn.model import GaussianRBF, edge_geometry
    from qso3_tvm.nn.ops.geometry import GeometryKernel

    pos, src, dst, grads = _geometry_case(np.float64)
    rbf = GaussianRBF(20, 5.0).double()
    results = []
    for geometry in (edge_geometry, GeometryKernel()):
        p = torch.from_numpy(pos).requires_grad_(True)
        outs = geometry(p, torch.from_numpy(src), torch.from_numpy(dst), rbf, 5.0)
        loss = sum((o * torch.from_numpy(g)).sum() for o, g in zip(outs, grads))
        results.append([o.detach() for o in outs] + [torch.autograd.grad(loss, p)[0]])
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert (results[0][1] == 0).any() and (results[0][1] > 0).any()  # edges on both sides of the cutoff


@pytest.mark.parametrize("e", [40, 4000])  # 4000 edges: rows of the forward on the thread pool (parallel_rows)
def test_edge_geometry_tir_kernels_match_torch_reference(e):
    from qso3_tvm.compiler.kernels import geometry
    from qso3_tvm.compiler.kernels.schedule import parallel_rows
    from qso3_tvm.nn.model import GaussianRBF

    target = resolve_target("x86-64").tvm_target()
    pos, src, dst, grads = _geometry_case(np.float32, e=e)
    rbf = GaussianRBF(20, 5.0)
    centers, gamma, t = rbf.centers.numpy(), float(rbf.gamma), torch.from_numpy
    fwd = [t(x) for x in (pos, src, dst, centers)]
    cases = [(geometry.forward_func(20, gamma, 5.0), [pos, src, dst, centers], torch.ops.qso3.edge_geometry(*fwd, gamma, 5.0)),
             (geometry.backward_func(20, gamma, 5.0), grads + [pos, src, dst, centers],
              [torch.ops.qso3.edge_geometry_backward(*map(t, grads), *fwd, gamma, 5.0)])]
    for func, args, refs in cases:
        vm = tvm.relax.VirtualMachine(tvm.compile(parallel_rows(_row_kernel_call(func, args, refs)), target=target), tvm.cpu())
        outs = vm["main"](*(tvm.runtime.tensor(x) for x in args))
        for out, ref in zip(outs if len(refs) > 1 else [outs], refs):
            np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=2e-6 * np.abs(ref.numpy()).max())


def test_quantized_graph_runs_custom_operators():
    """The deployed int8 model's exported graph is mapped onto our TIR kernels."""
    from qso3_tvm.compiler.export import export_energy_forces
    from qso3_tvm.compiler.module import deployable
    from qso3_tvm.compiler.relax_import import import_to_relax
    from qso3_tvm.graph.molecules import random_molecule
    from qso3_tvm.nn.quant import QuantConfig, quantize_model
    from qso3_tvm.nn.testing import model_energy_forces, tiny_model

    model = quantize_model(tiny_model(torch.float32, seed=4), QuantConfig(direction_ste="geometric"))
    model_energy_forces(model, *random_molecule(12, seed=1))  # calibrate
    names = {gv.name_hint for gv in import_to_relax(export_energy_forces(deployable(model))).functions}
    assert any(n.startswith("qso3_int8_linear_") for n in names)  # the scalar-branch Linears
    assert any(n.startswith("qso3_int8_qkv_") for n in names) and any("_silu" in n for n in names)  # fused q, k, value; SiLU folded
    assert any(n.startswith("qso3_int8_qkv_grad_") for n in names)  # and their backward
    assert {"qso3_l2_attention_2x8", "qso3_l2_attention_backward_2x8", "qso3_mddq_16_255_1", "qso3_mddq_backward_16_255_1_geometric", "qso3_messages_16x2",
            "qso3_messages_backward_16x2", "qso3_residual_norms_16", "qso3_residual_norms_backward_16", "qso3_gated_update_16",
            "qso3_gated_update_backward_16", "qso3_edge_geometry_8", "qso3_edge_geometry_backward_8", "qso3_edge_pairs"} <= names
    assert any(n.startswith("qso3_scatter_rows_add_float32_") for n in names)  # neighbor sums


@pytest.mark.parametrize("preset, instr", GRAD_INSTR)
@pytest.mark.parametrize("silu", [False, True])
def test_int8_grad_product_kernel_matches_torch(preset, instr, silu):
    """The fused int8 backward product (row steps, two int8 code vectors, both products, the input's straight-through
    mask, SiLU' with `silu`) against nn.ops.int8_linear.int8_grad_product_op; N = 20 outputs exercise the padding to
    the instruction's block."""
    from qso3_tvm.compiler.kernels.int8_matmul import grad_product_func, grad_product_weights
    from qso3_tvm.nn.int8 import input_grad_mask, int8_grad_product
    from qso3_tvm.nn.ops.int8_linear import int8_grad_product_op

    spec = resolve_target(preset)
    target = spec.tvm_target()
    kern = dot_kernel(target)
    n, k, m = 64, 20, 37
    lib = tvm.compile(tvm.IRModule({"main": grad_product_func(n, k, kern, -127, 127, silu)}), target=target)
    assert_grad_instr(lib.mod.inspect_source("asm"), preset, instr)
    if not spec.local:
        pytest.skip(f"{preset} does not run here")
    g = RNG.standard_normal((m, n)).astype(np.float32)
    g[5] = 0  # a row with no gradient (a padding atom) stays zero
    w = RNG.integers(-127, 128, (k, n)).astype(np.int8)
    s_w = (RNG.random(n) * 0.01 + 1e-3).astype(np.float32)
    x, s_x = (RNG.standard_normal((m, k)) * 2).astype(np.float32), np.array([0.013], np.float32)  # |x / s_x| > 127 often
    packed, corr = grad_product_weights(w, kern)
    out = tvm.runtime.tensor(np.full((m, corr.shape[0]), np.nan, np.float32))
    lib(*map(tvm.runtime.tensor, (g, s_w, packed, corr, x, s_x)), out)
    got = out.numpy()[:, :k]
    t = torch.from_numpy
    ref = int8_grad_product_op(t(g), t(w), t(s_w), t(x), t(s_x).reshape(()), -127, 127, silu).numpy()
    mask = input_grad_mask(t(x), t(s_x).reshape(()), -127, 127, silu).numpy()
    assert 0.1 < (mask == 0).mean() < 0.9
    exact = g @ (w.astype(np.float32) * s_w).T * mask
    assert np.abs(int8_grad_product(t(g), t(w), t(s_w)).numpy() * mask - ref).max() == 0
    assert np.all(got[5] == 0)
    # LLVM may fuse a multiply-add where torch rounds twice: a low code can differ by one (1/254 of a step); with
    # `silu` the kernel's SiLU' comes from the fast exp (relative error up to a few 1e-5, kernels.fast_math)
    np.testing.assert_allclose(got, ref, rtol=5e-5 if silu else 0, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ref - exact).max() < 1e-4 * np.abs(exact).max()  # two int8 levels: ~fp32-like products


def test_parallel_rows_splits_large_static_products_only():
    """parallel_rows: a row kernel called on 4096 static rows runs on the thread pool (same numbers as the serial
    kernel), one called on symbolic rows stays serial."""
    from qso3_tvm.compiler.kernels.int8_matmul import emit_linear
    from qso3_tvm.compiler.kernels.schedule import parallel_rows

    target = resolve_target("x86-64").tvm_target()
    w = RNG.integers(-127, 128, (64, 32)).astype(np.int8)
    s_w, b = np.full(32, 0.01, np.float32), RNG.standard_normal(32).astype(np.float32)
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    big, small = relax.Var("big", relax.TensorType([4096, 64], "float32")), relax.Var("small", relax.TensorType([m, 64], "float32"))
    with bb.function("main", [big, small]):
        with bb.dataflow():
            outs = [emit_linear(bb, x, w, 0.02, s_w, b, (-127, 127, 0), dot_kernel(target)) for x in (big, small)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    mod = parallel_rows(bb.get())
    calls = [c.args[0].name_hint for c in _calls(mod["main"])]
    assert calls[0].endswith("_parallel") and not calls[1].endswith("_parallel")
    vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
    x = RNG.standard_normal((4096, 64)).astype(np.float32)
    got_big, got_small = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(x))
    np.testing.assert_array_equal(got_big.numpy(), got_small.numpy())


def _calls(func):
    """The call_tir calls of a Relax function, in order."""
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and e.op == tvm.ir.Op.get("relax.call_tir") else None)
    return found
