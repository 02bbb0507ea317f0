"""torch halves of the custom operators (MDDQ, L2 attention, messages, update, edge geometry and pairs, int8 Linears);
their TIR kernels are in compiler.kernels."""


def fuse_operators(model):
    """`model` (changed in place) with its messages, its update around the MLP and its edge geometry as custom
    operators, and its radial filters computed once per pair of edges (nn.ops.pairs): every CPU build, whatever
    its precision (nn.int8.to_int8 adds the quantized ones)."""
    from .geometry import fuse_geometry
    from .messages import fuse_messages
    from .update import fuse_update

    return fuse_geometry(fuse_update(fuse_messages(model)))


def linear_weight(linear):
    """The weight matrix (out, in) of a vector-branch Linear (float, or nn.int8.Int8WeightLinear dequantized) that a
    fused operator takes as a constant; such Linears have no bias (a bias breaks equivariance)."""
    if getattr(linear, "bias", None) is not None:
        raise ValueError("the fused operators take a vector Linear without bias (a bias breaks equivariance)")
    if hasattr(linear, "dequantized_weight"):  # nn.int8.Int8WeightLinear
        return linear.dequantized_weight()
    return linear.weight


def weight_mix(weight):
    """The vector Linear of a weight matrix (out, in) as the function t -> t W^T that the model's definitions take."""
    return lambda t: t @ weight.T
