"""The HF-model face of an adapted graph: what transformers, TRL and accelerate ask of a model.

``AdaptedModule`` inherits it. Where an attribute is the base model's, it is the base model's
object: ``config`` is the config the model was captured with (``capture_info.config``), and
``generation_config`` its own ``GenerationConfig``, so a change through either side is seen by
both. The graph keeps no HF model. What the graph cannot honour is an error naming the
attribute: an ``AttributeError`` for a missing attribute (so ``hasattr`` says False), a
``FxpeftError`` for a call it refuses.

``generate``, ``save_pretrained`` and the checkpointed copy that ``gradient_checkpointing_enable``
switches to live in layers above this one; they register themselves (``registry.provide``).

>>> import torch, fxpeft
>>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)), fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
>>> hasattr(gm, "config"), gm.dtype, gm.device
(False, torch.float32, device(type='cpu'))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.capture.linear_sites import find_linear_sites
from fxpeft.capture.program import HfFace
from fxpeft.errors import FxpeftError
from fxpeft.graph.state import graph_state
from fxpeft.registry import is_adapter_parameter, provided

REQUIRE_GRAD_META = "fxpeft_require_grad"  # the node enable_input_require_grads adds
# Attributes that exist only for a transformers model's graph; elsewhere an AttributeError
# that says why (``__getattr__`` re-raises it, as Python falls back there from a property).
HF_ONLY = ("config", "generation_config", "name_or_path", "main_input_name", "dtype", "base_model")


class FaceAttributeError(FxpeftError, AttributeError):
    """An HF attribute this graph does not have, with the reason."""


def require_grad(x: torch.Tensor) -> torch.Tensor:
    """The input embeddings' output, made to require grad while gradients are recorded (HF's
    ``enable_input_require_grads`` hook): checkpointed layers then see an input that needs one.

    >>> require_grad(torch.zeros(2)).requires_grad
    True
    """
    if torch.is_grad_enabled() and not x.requires_grad:
        return x.requires_grad_(True)
    return x


def checkpoint_switch(generated: Callable[..., Any]) -> Callable[..., Any]:
    """The graph's generated ``forward``, wrapped so that while checkpointing is on it runs the
    checkpointed copy's (``fxpeft.fuse`` keeps one per state of the graph: ``add_adapter`` or
    ``to`` make a new one). It is the class's ``forward``, so a caller that wraps ``forward``
    (TRL's fused LM head) still reaches it; its signature is the generated one.

    >>> def forward(self, input_ids, labels=None): return "plain"
    >>> import inspect; str(inspect.signature(checkpoint_switch(forward)))
    '(self, input_ids, labels=None)'
    """
    if getattr(generated, "__wrapped__", None) is not None and getattr(generated, "_fxpeft_switch", False):
        return generated

    @functools.wraps(generated)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if graph_state(self).checkpointing:
            return provided("checkpointed_copy")(self).forward(*args, **kwargs)
        return generated(self, *args, **kwargs)
    forward._fxpeft_switch = True
    return forward


class HfModelFace:
    """The HF ``PreTrainedModel`` attributes of an adapted graph (mixed into ``AdaptedModule``)."""

    capture_info: Any

    def _hf(self, attribute: str) -> HfFace:
        info = self.capture_info
        if info is None or info.hf is None:
            raise FaceAttributeError(
                f"{type(self).__name__}.{attribute}: this graph was captured from "
                f"{getattr(info, 'model_class', 'a module')}, not a transformers model, so it has "
                f"no {attribute}")
        return info.hf

    def __getattr__(self, name: str) -> Any:
        if name in HF_ONLY:  # the property raised: raise its message, not Module's
            return getattr(HfModelFace, name).fget(self)
        return super().__getattr__(name)

    @property
    def config(self) -> Any:
        """The base model's own config object (``capture_info.config``)."""
        self._hf("config")
        return self.capture_info.config

    @property
    def generation_config(self) -> Any:
        """The base model's own ``GenerationConfig``; assigning one replaces it, as on HF."""
        return self._hf("generation_config").generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        face = self._hf("generation_config")
        self.capture_info = dataclasses.replace(
            self.capture_info, hf=dataclasses.replace(face, generation_config=value))

    @property
    def name_or_path(self) -> str:
        self._hf("name_or_path")
        return self.capture_info.config.name_or_path

    @property
    def main_input_name(self) -> str:
        return self._hf("main_input_name").main_input_name

    @property
    def dtype(self) -> torch.dtype:
        """The base weights' floating dtype (adapters may be fp32 on a half base)."""
        found = next((p.dtype for n, p in self.named_parameters()
                      if p.is_floating_point() and not is_adapter_parameter(n)), None)
        if found is None:
            raise FaceAttributeError(f"{type(self).__name__}.dtype: the graph has no floating base weights")
        return found

    @property
    def device(self) -> torch.device:
        """The first parameter's device, as ``PreTrainedModel.device``."""
        return next(self.parameters(), torch.zeros(())).device

    def can_generate(self) -> bool:
        """Whether ``generate`` decodes this graph: a transformers causal LM (not a quantized one)."""
        face = self.capture_info.hf if self.capture_info is not None else None
        if face is None or not face.can_generate:
            return False
        return not any(site.kind == "quantized" for site in find_linear_sites(self))

    def get_input_embeddings(self) -> torch.nn.Module:
        """The module holding the input embedding table (its ``weight`` is the base model's)."""
        path = self._hf("get_input_embeddings").input_embeddings
        if path is None:
            raise FxpeftError(f"{type(self).__name__}.get_input_embeddings(): the base model has none")
        return self.get_submodule(path)

    def get_output_embeddings(self) -> "torch.nn.Module | None":
        """The module holding the LM head's weight; None where the model has no LM head (as HF)."""
        path = self._hf("get_output_embeddings").output_embeddings
        if path is None:
            return None
        head = self.get_submodule(path)
        if "bias" not in head._parameters and not hasattr(head, "bias"):
            head.register_parameter("bias", None)  # as nn.Linear(bias=False): callers read it
        return head

    @property
    def base_model(self) -> torch.nn.Module:
        """The graph without its LM head, returning ``last_hidden_state``: what TRL's fused LM
        head calls (``fxpeft.transforms.backbone``)."""
        head = self._hf("base_model").output_embeddings
        if head is None:
            raise FaceAttributeError(f"{type(self).__name__}.base_model: fxpeft builds it for "
                                     f"causal LMs (a graph with an LM head); this one has none")
        return provided("backbone")(self, head, self.is_gradient_checkpointing)

    # -- enable_input_require_grads: a node after the input embedding lookup -----------------------

    def _embedding_lookups(self) -> list[torch.fx.Node]:
        weight = f"{self._hf('enable_input_require_grads').input_embeddings}.weight"
        return [node for node in self.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default)
                if getattr(node.args[0], "target", None) == weight]

    def enable_input_require_grads(self) -> None:
        """HF's switch: the input embeddings' output requires grad, so a frozen embedding still
        lets gradients through checkpointed layers. A graph node (``require_grad``) does it."""
        lookups = self._embedding_lookups()
        if not lookups:
            raise FxpeftError(f"{type(self).__name__}.enable_input_require_grads(): the graph has "
                              f"no lookup of {self.capture_info.hf.input_embeddings}.weight")
        for lookup in lookups:
            if any(user.meta.get(REQUIRE_GRAD_META) for user in lookup.users):
                continue
            with self.graph.inserting_after(lookup):
                marked = self.graph.call_function(require_grad, (lookup,))
            marked.meta = {**lookup.meta, REQUIRE_GRAD_META: True}
            lookup.replace_all_uses_with(marked, delete_user_cb=lambda user: user is not marked)
        self.recompile()

    def disable_input_require_grads(self) -> None:
        for node in [n for n in self.graph.nodes if n.meta.get(REQUIRE_GRAD_META)]:
            node.replace_all_uses_with(node.args[0])
            self.graph.erase_node(node)
        self.recompile()

    # -- gradient checkpointing: forward runs the checkpointed copy (fxpeft.fuse's pass alone) -----

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: "dict | None" = None,
                                      **kwargs: Any) -> None:
        """HF's switch (``Trainer(gradient_checkpointing=True)``, TRL's default): from now on
        ``forward`` runs a copy of this graph, sharing its tensors, whose layers are recomputed
        in backward (``fxpeft.fuse``'s ``checkpoint_layers`` pass and no other). Same values and
        gradients; always non-reentrant, whatever ``use_reentrant`` says."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: "dict | None" = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5.25's name for ``gradient_checkpointing_enable``."""
        options = dict(activation_checkpointing_kwargs or {})
        options.pop("use_reentrant", None)  # regions are non-reentrant: the same gradients
        refused = [*options, *(["every_n_layers"] if every_n_layers != 1 else []),
                   *(["offload"] if offload else [])]
        if refused:
            raise FxpeftError(f"{type(self).__name__}.gradient_checkpointing_enable: "
                              f"{refused[0]} is not supported (every layer is checkpointed, "
                              f"activations stay on the device)")
        provided("checkpointed_copy")(self)  # now: a graph the pass cannot split fails here
        graph_state(self).checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        graph_state(self).checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return graph_state(self).checkpointing

    is_activation_checkpointing = is_gradient_checkpointing

    def add_model_tags(self, tags: "str | list[str]") -> None:
        """HF's model-card tags (TRL adds ``trl``, ``sft``): kept in ``model_tags``."""
        known = self.__dict__.setdefault("model_tags", [])
        known.extend(t for t in ([tags] if isinstance(tags, str) else tags) if t not in known)

    # -- what upper layers do ---------------------------------------------------------------------

    def print_trainable_parameters(self) -> None:
        """PEFT's line: ``trainable params: ... || all params: ... || trainable%: ...``."""
        provided("trainable_parameters")(self, print_line=True)

    def save_pretrained(self, save_directory: "str | Any", **kwargs: Any) -> None:
        """Every adapter in PEFT's layout (``fxpeft.io.checkpoints.save_adapters``)."""
        provided("save_pretrained")(self, save_directory, **kwargs)

    def generate(self, input_ids: "torch.Tensor | None" = None, **kwargs: Any) -> torch.Tensor:
        """transformers' ``generate`` over the KV-cached decode graph, with ``GenerationConfig``
        semantics (``fxpeft.generation.decoding.generate_hf``)."""
        return provided("generate")(self, input_ids, **kwargs)
