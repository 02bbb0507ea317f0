"""Edge pairs as one TIR kernel (E symbolic): the operator of nn.ops.pairs, which defines them, replaced at import
(compiler.relax_import). A serial pass ranks the canonical edges (src < dst); every other edge, in edge order, takes
the first unmatched copy of its reverse among the edges into its sender (found by bisection when the edges are
grouped by receiver, as the neighbor lists are; among all edges otherwise). Ranks are clamped and every output
starts valid, so edges that are not pairs give wrong pairs but no index outside the arrays (the runtime only makes
pairs: graph.convention; the torch operator refuses others)."""

from __future__ import annotations


def pairs_func():
    """PrimFunc (src, dst (e,) int64) -> pair (e,), canon (p,), partner (p,) int64, p = e // 2."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def edge_pairs(src_h: T.handle, dst_h: T.handle, pair_h: T.handle, canon_h: T.handle, partner_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        e, p = T.int64(), T.int64()
        src = T.match_buffer(src_h, (e,), "int64")
        dst = T.match_buffer(dst_h, (e,), "int64")
        pair = T.match_buffer(pair_h, (e,), "int64")
        canon = T.match_buffer(canon_h, (p,), "int64")
        partner = T.match_buffer(partner_h, (p,), "int64")
        with T.sblock("root"):
            c = T.alloc_buffer((4,), "int64")  # canonical edges so far, whether dst never decreases, search bounds
            c[0] = T.int64(0)
            c[1] = T.int64(1)
            for q in range(p):
                canon[q] = T.int64(0)
                partner[q] = T.int64(-1)  # unmatched
            for i in range(e):
                pair[i] = T.int64(0)
                if i > 0:
                    if dst[i] < dst[i - 1]:
                        c[1] = T.int64(0)
                if src[i] < dst[i]:
                    pair[i] = T.min(c[0], p - T.int64(1))
                    canon[pair[i]] = i
                    c[0] = c[0] + T.int64(1)
            for i in range(e):
                if src[i] >= dst[i]:  # its reverse dst[i] -> src[i] is among the edges into src[i]
                    c[2] = T.int64(0)
                    c[3] = e
                    if c[1] == 1:  # grouped by receiver: the first edge into src[i] by bisection
                        while c[2] < c[3]:
                            if dst[(c[2] + c[3]) // 2] < src[i]:
                                c[2] = (c[2] + c[3]) // 2 + 1
                            else:
                                c[3] = (c[2] + c[3]) // 2
                        c[3] = e
                    while c[2] < c[3]:
                        if src[c[2]] == dst[i] and dst[c[2]] == src[i] and src[c[2]] < dst[c[2]] and partner[pair[c[2]]] < 0:
                            pair[i] = pair[c[2]]
                            partner[pair[i]] = i
                            c[3] = c[2]
                        elif c[1] == 1 and dst[c[2]] > src[i]:
                            c[3] = c[2]
                        else:
                            c[2] = c[2] + 1
            for q in range(p):
                if partner[q] < 0:
                    partner[q] = canon[q]

    return edge_pairs.with_attrs({"global_symbol": "qso3_edge_pairs", "tirx.is_scheduled": True, "op_pattern": 8})
