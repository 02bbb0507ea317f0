"""Running compiled artifacts: here (compiled.CompiledModel), on a board over TVM RPC (remote.RemoteModel),
and as an ASE calculator. Needs numpy and the TVM runtime only: never torch or the compiler."""

DEFAULT_KEY = "qso3"  # the RPC key boards started by qso3-tvm serve under and direct clients send by default
