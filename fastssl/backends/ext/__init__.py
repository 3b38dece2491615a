"""The C++ and CUDA backends: thin glue over ``fastssl._C`` (csrc/), one module per family.
These modules import ``fastssl._C`` at the top: the tables load them only when they run."""
