"""``fxpeft.reference_model(gm)``: the base model as a graph sharing ``gm``'s frozen base weights.

Preference trainers (``trl.DPOTrainer``) score a batch under a frozen reference. For a PEFT model
TRL disables the adapters, after an ``isinstance`` check that an fxpeft graph does not pass, and
otherwise takes a separate ``ref_model``. This is that model without a second copy of the base:
an emitted copy of the graph (as ``fuse`` makes) with every adapter's nodes removed, so it holds
no adapter tensor and shares each base tensor with ``gm``; it costs only its graph and code. Its
dropouts are its own (the trainer puts it in eval mode while ``gm`` trains).
"""

from __future__ import annotations

import copy

from fxpeft.graph.dropout import ATTENTION_DROPOUT_MODULE
from fxpeft.graph.gates import adapter_names
from fxpeft.graph.records import strip_adapters
from fxpeft.graph.state import GraphState, set_graph_state
from fxpeft.names import DEFAULT_ADAPTER, DROPOUT_MODULE
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.capture.program import copy_graph


def reference_model(gm: AdaptedModule) -> AdaptedModule:
    """``gm`` with its adapters removed, in eval mode, sharing its base tensors: the reference
    model of ``trl.DPOTrainer(model=gm, ref_model=fxpeft.reference_model(gm), ...)``.

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2)).eval()
    >>> gm = fxpeft.rewrite(model, "lora_qv")
    >>> ref = fxpeft.reference_model(gm)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> torch.allclose(ref(ids).logits, model(ids).logits, atol=1e-6), ref.get_parameter("lm_head.weight") is model.lm_head.weight
    (True, True)
    >>> any("lora" in name for name, _ in ref.named_parameters())
    False
    """
    graph = copy_graph(gm.graph)
    strip_adapters(graph, set(adapter_names(gm)) | {DEFAULT_ADAPTER})
    # built from the stripped graph, the copy takes only what it reads: no adapter tensor, no
    # gate; every module it shares with gm stays untouched
    ref = AdaptedModule(gm, graph, class_name=f"Reference{type(gm).__name__}")
    ref.capture_info = gm.capture_info
    set_graph_state(ref, GraphState(role="reference"))  # no adapters: nothing to save, switch or strip
    ref.graph.eliminate_dead_code()
    ref.recompile()
    for name in (DROPOUT_MODULE, ATTENTION_DROPOUT_MODULE):
        if hasattr(ref, name):
            setattr(ref, name, copy.deepcopy(getattr(gm, name)))
    ref.graph.lint()
    return ref.eval()
