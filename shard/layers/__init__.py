"""Building blocks of the Llama family, tensor-parallel aware, LoRA applied inside the linears."""
