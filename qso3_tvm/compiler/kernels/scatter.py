"""Row scatter as one TIR kernel: out = data; out[index[e], :] (+)= values[e, :] over rows of a static
width, the channel loop vectorized. It replaces TVM's generic scatter_elements for the neighbor sums
(index_add) and the backward of row gathers (index_put) on CPU targets: that one needs the index
broadcast to the values' full shape (an extra edge-sized int64 tensor and kernel) and recomputes
div/mod address arithmetic per element."""

from __future__ import annotations


def scatter_rows_func(width: int, dtype: str, index_dtype: str, accumulate: bool):
    """PrimFunc (data (n, width), index (e,), values (e, width)) -> out (n, width); n, e symbolic."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def scatter_rows(data_h: T.handle, index_h: T.handle, values_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n, e = T.int64(), T.int64()
        data = T.match_buffer(data_h, (n, width), dtype)
        index = T.match_buffer(index_h, (e,), index_dtype)
        values = T.match_buffer(values_h, (e, width), dtype)
        out = T.match_buffer(out_h, (n, width), dtype)
        with T.sblock("root"):
            for a in range(n):
                for c in T.vectorized(width):
                    out[a, c] = data[a, c]
            for i in range(e):
                for c in T.vectorized(width):
                    if accumulate:
                        out[T.Cast("int64", index[i]), c] = out[T.Cast("int64", index[i]), c] + values[i, c]
                    else:
                        out[T.Cast("int64", index[i]), c] = values[i, c]

    name = f"qso3_scatter_rows_{'add' if accumulate else 'set'}_{dtype}_{width}"
    return scatter_rows.with_attrs({"global_symbol": name, "tirx.is_scheduled": True, "op_pattern": 8})
