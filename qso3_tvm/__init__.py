"""qso3-tvm: symmetry-preserving quantized molecular force fields, compiled with Apache TVM."""

__version__ = "0.1.0"
