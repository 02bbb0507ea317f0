"""Default CPU schedules for the fused kernels that have no hand-written or tuned schedule.

TVM 0.27's CPU pipeline legalizes and fuses but schedules nothing (serial loops, whatever LLVM's
auto-vectorizer finds). This rule, applied to every fused PrimFunc after FuseTIR:
  1. inlines elementwise producers into elementwise consumers (no intermediate buffers; never into
     a reduction, where an inlined producer would be recomputed once per output column);
  2. reductions (matmuls, channel sums): moves the reduction loops outside the innermost spatial
     loop so that loop runs over contiguous output channels, and vectorizes it;
  3. elementwise blocks: vectorizes the innermost loop when its extent is a static channel count
     (16-lane vectors, or unrolled 4- or 8-lane vectors when 16 does not divide it);
  4. static sizes (specialized buckets, static builds) of at least PARALLEL_MIN_ELEMENTS outputs:
     the outermost loop (atoms, edges) runs on the thread pool.
Symbolic loops over atoms and edges stay serial, and so do small static ones: at batch 1 a parallel
launch per kernel costs more than it saves. Tuned kernels (qso3-tvm tune) are marked scheduled and skipped.
"""

from __future__ import annotations

import math

VECTOR_LANES = 16  # float32 lanes of an AVX-512 register; NEON takes 4 and LLVM splits the rest
MAX_UNROLLED = 4 * VECTOR_LANES  # channel-sized loops only: never unroll a static loop over edges
PARALLEL_MIN_ELEMENTS = 65536  # outputs of a kernel worth a parallel launch (~10 µs of work at one thread)
PARALLEL_MIN_EDGES = 2048  # edges from which our edge kernels (messages, attention) run heads on the thread pool
ROW_KERNEL = "qso3_row_kernel"  # PrimFunc attribute of our kernels with one "row" block per output row (parallel_rows)
ROW_CHUNKS = 16  # row blocks of a parallel row kernel: even shares for 1, 2, 4, 8 or 16 threads


def _static_extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext.value) if hasattr(ext, "value") else None


def _vectorize_innermost(sch, loop) -> None:
    ext = _static_extent(sch, loop)
    if ext is None or ext < 2:
        return
    lanes = math.gcd(ext, VECTOR_LANES)  # 16-lane vectors, or the widest that divides (20 radial functions: 4)
    if ext > VECTOR_LANES:
        if lanes < 4:
            return
        outer, loop = sch.split(loop, [None, lanes])
        if lanes < VECTOR_LANES and ext <= MAX_UNROLLED:
            sch.unroll(outer)  # one odd-sized vector instead makes LLVM scalarize the accumulators
    sch.vectorize(loop)


def _inline_elementwise(sch, infos):
    """compute_inline spatial producers whose consumers are all spatial; returns the rest."""
    changed = True
    while changed:
        changed = False
        for info in list(infos):
            if info.dom_kind().strip("S") or not _consumers_spatial(sch, info.block_rv):
                continue
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 (not inlinable: output block, opaque access, ...)
                continue
            infos.remove(info)
            changed = True
    return infos


def _consumers_spatial(sch, block) -> bool:
    from tvm.s_tir.dlight.analysis import get_sblock_info

    consumers = sch.get_consumers(block)
    return bool(consumers) and all(not get_sblock_info(sch, c).dom_kind().strip("S") for c in consumers)


def schedule_block(sch, info) -> None:
    kinds, block = info.dom_kind(), info.block_rv
    loops = sch.get_loops(block)
    if "O" in kinds or len(loops) != len(kinds) or not loops:
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return
    parallel = _worth_parallel(sch, spatial)
    if reduce:
        if _static_extent(sch, spatial[-1]) is None:
            return
        sch.reorder(*spatial[:-1], *reduce, spatial[-1])
        _vectorize_innermost(sch, spatial[-1])  # before decompose_reduction: TVM refuses it on the update block
        if parallel:
            sch.parallel(spatial[0])
        sch.decompose_reduction(block, reduce[0])
        return
    _vectorize_innermost(sch, spatial[-1])
    if parallel:
        sch.parallel(spatial[0])


def _worth_parallel(sch, spatial) -> bool:
    """Whether the outermost spatial loop goes to the thread pool: every spatial extent static, at least
    PARALLEL_MIN_ELEMENTS outputs, and a loop besides the innermost (which is vectorized)."""
    extents = [_static_extent(sch, lp) for lp in spatial]
    return len(spatial) >= 2 and None not in extents and math.prod(extents) >= PARALLEL_MIN_ELEMENTS


class CPUDefault:
    """A dlight-style rule (apply(func, target, tunable) -> Schedule | None)."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        if target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in _inline_elementwise(sch, infos):
            try:
                schedule_block(sch, info)
            except Exception:  # noqa: BLE001 (a block this rule cannot handle keeps its loops)
                continue
        return sch

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"


def default_cpu_schedule(target):
    from tvm.s_tir.dlight import ApplyDefaultSchedule

    return ApplyDefaultSchedule(CPUDefault())


def row_kernel(func, name: str):
    """A hand-scheduled PrimFunc with one "row" block per output row, marked for parallel_rows: named, kept out of the
    default schedule and opaque to FuseOps."""
    return func.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "op_pattern": 8, ROW_KERNEL: True})


def parallel_rows(mod):
    """`mod` with our row kernels (int8_matmul's linear_func and grad_product_func, kernels.mddq) of calls at static sizes of at least
    PARALLEL_MIN_ELEMENTS outputs (the specialized buckets' edge and atom products) replaced by a copy whose rows
    run on the thread pool in ROW_CHUNKS chunks; symbolic sizes keep the serial kernel, as the default CPU
    schedule does (a parallel launch costs more than a small product)."""
    import tvm
    from tvm import relax, s_tir, tirx

    @relax.expr_functor.mutator
    class Parallel(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_, self.copies = mod, {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != tvm.ir.Op.get("relax.call_tir") or not self._big(call):
                return call
            gv = call.args[0]
            func = self.mod_[gv]
            if not (isinstance(func, tirx.PrimFunc) and func.attrs and ROW_KERNEL in func.attrs):
                return call
            if gv.name_hint not in self.copies:
                sch = s_tir.Schedule(func)
                (rows,) = sch.get_loops(sch.get_sblock("row"))
                sch.parallel(sch.split(rows, [ROW_CHUNKS, None])[0])
                name = gv.name_hint + "_parallel"
                self.copies[gv.name_hint] = self.builder_.add_func(sch.mod["main"].with_attr("global_symbol", name), name)
            return relax.Call(call.op, [self.copies[gv.name_hint], *call.args[1:]], call.attrs, call.ty_args)

        @staticmethod
        def _big(call):
            ty = call.ty.fields[0] if isinstance(call.ty, relax.TupleType) else call.ty  # several outputs: the first's rows
            shape = getattr(ty, "shape", None)
            dims = [d.value if isinstance(d, tirx.IntImm) else None for d in (shape or [])]
            return bool(dims) and None not in dims and math.prod(dims) >= PARALLEL_MIN_ELEMENTS

    p = Parallel(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            p.builder_.update_func(gv, p.visit_expr(func))
    return p.builder_.get()
