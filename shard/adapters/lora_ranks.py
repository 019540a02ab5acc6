"""LoRA ranks the SGMV kernels serve, torch-free so the command line can check them.

csrc/ops.cpp dispatches by the padded rank of a batch to one kernel per class below and refuses
ranks above the last; decode graphs are captured per class as well. This is the list's one
home: tests/test_lora_ranks.py checks the kernels' instantiations and dispatch against it.
"""

RANK_CLASSES = (16, 32, 64, 128)
MAX_RANK = RANK_CLASSES[-1]  # csrc/ops.cpp: "rank <= 128"
