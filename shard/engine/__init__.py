"""The engine: the step loop and everything a step needs besides the model.

Owns: the step loop thread (``engine``) and the messages other threads send it (``inbox``),
continuous batching (``scheduler``), requests and their state (``sequence``), the per-step plan
(``step_plan``), running a step request by request after a fault (``isolated_step``,
``faults``), the paged KV cache and its prefix cache (``kv_cache``, ``prefix_cache``, its
index, ``prefix_index``, and the prefix keys it reports for placement, ``prefix_keys``),
sampling and detokenization (``sampling``, ``detokenizer``), running a plan (``executor``,
``model_runner``) with its forward inputs (``forward_inputs``) and decode graphs
(``decode_graphs``: capture and replay; the shapes they pad to, ``graph_shapes``; moving a
batch's tensors by path, ``tensor_tree``), and the memory budget of a shard (``memory_plan``).

May import: ``adapters/``, ``model/``, ``parallel/``, ``ops/``, and the process-wide
``shard.metrics``; not ``shard.config``: the composition root passes the values each part
needs.
"""
