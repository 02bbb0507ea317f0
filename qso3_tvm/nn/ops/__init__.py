"""torch halves of the custom operators (MDDQ, L2 attention); their TIR kernels are in compiler.kernels."""
