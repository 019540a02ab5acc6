"""Building blocks of the Llama family, tensor-parallel aware, LoRA applied inside the linears.

May import: ``parallel.group`` (collectives), ``ops/`` (kernels), and the rest of ``model/``.
"""
