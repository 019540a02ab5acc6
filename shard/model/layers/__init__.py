"""Building blocks of the Llama family, tensor-parallel aware, LoRA applied inside the linears.

May import: ``parallel.group`` (collectives), ``ops/`` (kernels), and ``model.config``,
``model.forward_meta`` and ``model.fusion``; ``lora`` still takes ``AdapterWeights`` from
``adapters/`` (issue 20).
"""
