"""The adapted GraphModule: a ``torch.fx.GraphModule`` whose train/eval switch is data.

Every dropout in it goes through the shared modules of ``fxpeft.graph.dropout`` (the emit step puts
them there), so ``gm.train()`` / ``gm.eval()`` only flip ``training`` flags: the code is never
regenerated, and under ``torch.compile`` each mode compiles once, later switches hit the cache.
"""

from __future__ import annotations

import copy
import sys
import traceback
from typing import Any, Iterator

import torch
import torch.fx

from fxpeft.runtime import apply as adapt, compile_cache, input_checks
from fxpeft.runtime.hf_face import HfModelFace, checkpoint_switch
from fxpeft.graph import records as adapter_set, gates
from fxpeft.errors import FxpeftError
from fxpeft import registry
from fxpeft.names import OUTPUT_MODULE, is_fxpeft_node


CHECKPOINTING_ADVICE = ("call gm.gradient_checkpointing_enable() on the graph (or use "
                        "fxpeft.fuse(gm, checkpoint='layers') for a fused copy that checkpoints each layer)")


SHARDED_UNDER_DDP = ("DistributedDataParallel cannot wrap an fxpeft graph that FSDP2 has sharded "
                     "(plain accelerator.prepare on a CPU, or transformers.Trainer, does that): "
                     "prepare it with fxpeft.helpers.sharding.accelerate_prepare, or train it with "
                     "fxpeft.Trainer and fsdp arguments")


def is_fsdp_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` has made ``module`` one of its units.

    >>> is_fsdp_sharded(torch.nn.Linear(2, 2))
    False
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


class AdaptedModule(HfModelFace, torch.fx.GraphModule):
    """What ``fxpeft.rewrite`` returns. ``train()`` / ``eval()`` switch every dropout in the graph.

    >>> gm = AdaptedModule(torch.nn.Module(), torch.fx.Graph())
    >>> gm.eval().training
    False
    """

    capture_info: Any = None  # fxpeft.capture.program.CaptureInfo, set by the emit step
    # Whether a call reads its token ids to check them against the vocabulary
    # (fxpeft.runtime.input_checks): None on the CPU only (on a GPU it is a sync), True always.
    check_token_values: "bool | None" = None

    def __init__(self, root: Any, graph: torch.fx.Graph, class_name: str = "GraphModule",
                 generate_code: bool = True) -> None:
        # Without generate_code, the module has no forward until ``recompile`` (``fxpeft.rewrite``
        # calls it once after its passes, which change the graph: generating the code of a
        # 30-layer model twice was a fifth of a rewrite from the capture cache).
        object.__setattr__(self, "_fxpeft_code_deferred", not generate_code)
        super().__init__(root, graph, class_name)
        # bad tensors are refused here, before the graph and outside torch.compile's frame
        self.register_forward_pre_hook(input_checks.check_inputs, with_kwargs=True)
        # adapter_names= becomes an index tensor before torch.compile's frame (no recompiles)
        self.register_forward_pre_hook(gates.index_sample_names, with_kwargs=True)
        self.register_forward_pre_hook(gates.refuse_dropped_adapters)
        compile_cache.activate()  # a first torch.compile in a fresh inductor folder starts warm

    def recompile(self) -> Any:
        """``GraphModule.recompile``; the generated ``forward`` then runs the checkpointed copy
        while ``gradient_checkpointing_enable()`` is on (``hf_face.checkpoint_switch``).
        A subclass made after the first compile (FSDP2's ``fully_shard`` makes one) keeps its
        base's call wrapper: fx would give it a new one whose ``super().__call__`` is the
        base's ``call_wrapped`` again, a loop."""
        if self.__dict__.pop("_fxpeft_code_deferred", False):  # GraphModule.__init__'s call
            return None
        keep_call_wrapper(self)
        result = super().recompile()
        type(self).forward = checkpoint_switch(type(self).forward)
        wrapped = vars(type(self)).get("_wrapped_call")
        if wrapped is not None and not isinstance(wrapped, _WrappedCall):
            type(self)._wrapped_call = _WrappedCall(wrapped.cls, wrapped.cls_call)
        return result

    def ensure_code(self) -> None:
        """Generate ``forward`` if the module was built with ``generate_code=False`` and no
        pass has recompiled it since.

        >>> gm = AdaptedModule(torch.nn.Module(), torch.fx.Graph(), generate_code=False)
        >>> hasattr(gm, "_code"), gm.ensure_code(), hasattr(gm, "_code")
        (False, None, True)
        """
        if not hasattr(self, "_code"):
            self.recompile()

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What ``DistributedDataParallel`` reads first of a module it wraps: a graph FSDP2 has
        sharded (DTensor parameters, which DDP fails on deep inside) is refused here, by name,
        with the routes that work (plain ``accelerator.prepare`` on a CPU and the stock
        ``transformers.Trainer`` wrap it so). Otherwise what DDP was told, or no attribute."""
        if is_fsdp_sharded(self):
            raise FxpeftError(SHARDED_UNDER_DDP)
        if "_fxpeft_ddp_ignore" not in self.__dict__:
            raise AttributeError("_ddp_params_and_buffers_to_ignore")
        return self.__dict__["_fxpeft_ddp_ignore"]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: list[str]) -> None:
        self.__dict__["_fxpeft_ddp_ignore"] = list(names)  # DDP's own setter, kept working

    def _deepcopy_init(self) -> Any:
        return AdaptedModule.__init__  # GraphModule's would drop the pre-hook

    def __deepcopy__(self, memo: dict) -> "AdaptedModule":
        """``copy.deepcopy``: an independent graph (a reference model, an EMA copy). The adapter
        records in ``meta`` name the nodes they matched; they are copied last, pointing at the
        copy's nodes (a node copied on its own would copy export's fake tensors, and fail), with
        the attributes ``GraphModule``'s copy leaves out (``capture_info``, ...).

        >>> import fxpeft
        >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(2, 2)), fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
        >>> twin = copy.deepcopy(gm)
        >>> twin.get_parameter("0.lora_A.weight") is gm.get_parameter("0.lora_A.weight"), twin.adapter_names
        (False, ['default'])
        """
        matched = {m.candidate.node.graph for rec in adapter_set.adapter_records(self).values()
                   for m in rec.matches}
        for graph in matched - {self.graph}:  # a fused copy's records are its source graph's
            memo.update({id(node): node for node in graph.nodes})
        meta, self.meta = self.meta, {}
        try:
            copied = super().__deepcopy__(memo)
        finally:
            self.meta = meta
        for old, new in zip(self.graph.nodes, copied.graph.nodes):
            memo[id(old)] = new
        copied.meta = copy.deepcopy(meta, memo)
        for name in self.__dict__.keys() - copied.__dict__.keys():  # capture_info, ...: what
            copied.__dict__[name] = copy.deepcopy(self.__dict__[name], memo)  # GraphModule drops
        return copied

    # Export bakes the capture dtype into the graph (``cos.to(x.dtype)`` became a constant), so a
    # dtype conversion also retargets those constants (``retarget_dtype_constants``).

    def base_dtype(self) -> "torch.dtype | None":
        """The floating dtype of the base weights (adapters may differ: fp32 on half bases)."""
        try:
            return self.dtype
        except AttributeError:
            return None

    @property
    def loss_type(self) -> "str | None":
        """transformers' ``PreTrainedModel.loss_type`` (``"ForCausalLM"`` for a causal LM graph):
        the HF Trainer reads it to count a batch's target tokens, which a causal loss shifts.

        >>> AdaptedModule(torch.nn.Module(), torch.fx.Graph()).loss_type is None  # no HF head
        True
        """
        return getattr(getattr(self, OUTPUT_MODULE, None), "loss_type", None)

    def to(self, *args: Any, **kwargs: Any) -> "AdaptedModule":
        """``Module.to``; a device move also moves the device constants export baked into the
        graph (``arange(..., device=cpu)``), as ``torch.export.passes.move_to_device_pass``
        does for an ExportedProgram, and a dtype change retargets its dtype constants
        (``retarget_dtype_constants``)."""
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        before = self.base_dtype()
        moved = super().to(*args, **kwargs)
        if device is not None:
            move_device_constants(self, device)
        if dtype is not None and before is not None and dtype.is_floating_point and dtype != before:
            retarget_dtype_constants(self, before, dtype)
        return moved

    def cuda(self, device: "int | torch.device | None" = None) -> "AdaptedModule":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> "AdaptedModule":
        return self.to("cpu")

    # Module's own conversions bypass ``to``: route them through it.

    def half(self) -> "AdaptedModule":
        return self.to(torch.float16)

    def bfloat16(self) -> "AdaptedModule":
        return self.to(torch.bfloat16)

    def float(self) -> "AdaptedModule":
        return self.to(torch.float32)

    def double(self) -> "AdaptedModule":
        return self.to(torch.float64)


    # Several named adapters (fxpeft.graph.gates): switching fills gate buffers, so it never re-traces
    # and never recompiles under torch.compile.

    @property
    def adapter_names(self) -> list[str]:
        return gates.adapter_names(self)

    @property
    def active_adapters(self) -> list[str]:
        return gates.active_adapters(self)

    def set_adapter(self, names: "str | list[str]", inference_mode: bool = False) -> None:
        """Activate ``names`` (one adapter, or several that add up) and make them trainable
        (frozen with ``inference_mode``); the others go off and are frozen, as PEFT does."""
        adapter_set.activate(self, names, inference_mode)

    def disable_adapters(self) -> Iterator[None]:
        """``with gm.disable_adapters(): ...`` runs the base model."""
        return gates.disable_adapters(self)

    def add_adapter(self, adapter: str, rules: Any, **kwargs: Any) -> "AdaptedModule":
        """Splice another named adapter (inactive) into this graph; see ``fxpeft.add_adapter``."""
        return adapt.add_adapter(self, adapter, rules, **kwargs)

    def delete_adapter(self, adapter: str) -> None:
        adapter_set.delete_adapter(self, adapter)

    def update_and_allocate(self, step: int) -> None:
        """AdaLoRA's rank allocation for ``step`` (PEFT's ``update_and_allocate``), for adapters
        whose rules say ``auto_allocate = false``: call it after each ``optimizer.step()``,
        before ``zero_grad()``, numbering steps from 0 (others allocate by themselves).

        >>> import torch, fxpeft
        >>> from fxpeft.kinds.adalora import AdaLoraParams
        >>> rule = fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"]),
        ...                          params=AdaLoraParams(total_step=4, auto_allocate=False))
        >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)), rule)
        >>> gm(torch.randn(2, 4)).sum().backward()
        >>> gm.update_and_allocate(0)
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise FxpeftError(f"update_and_allocate: step must be an integer >= 0 (the optimizer "
                              f"steps taken before this one), got {step!r}")
        stateful = {kind: adapters for kind, adapters in adapter_set.adapters_by_kind(self).items()
                    if registry.get(kind).on_step is not None}
        if not stateful:
            raise FxpeftError("update_and_allocate: no adapter of this graph keeps state across "
                              "optimizer steps (AdaLoRA's rank allocation does)")
        for kind, adapters in stateful.items():
            registry.get(kind).on_step(self, adapters, step)


class _WrappedCall(torch.fx.graph_module._WrappedCall):
    """fx's call wrapper, which prints the generated line an error came from, without a
    generator: fx's walks the traceback with one, which ``torch.compile(fullgraph=True)``
    cannot trace, so an error a pre-hook raises on purpose (a bad input,
    ``fxpeft.runtime.input_checks``; unknown ``adapter_names``) surfaced as dynamo's
    ``Attempt to trace generator``."""

    # as fx's own frame, this one is not compiled; the frames it calls are (the forward)
    @torch.compiler.disable(recursive=False)
    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.cls_call is not None:
                return self.cls_call(obj, *args, **kwargs)
            return super(self.cls, obj).__call__(*args, **kwargs)
        except Exception as error:
            innermost = error.__traceback__
            while innermost is not None and innermost.tb_next is not None:  # no generator here
                innermost = innermost.tb_next
            code = innermost.tb_frame.f_code if innermost is not None else None
            if code is None or "eval_with_key" not in code.co_filename:
                raise
            report = traceback.FrameSummary(code.co_filename, innermost.tb_lineno, code.co_name)
            print(self._generate_error_message(report), file=sys.stderr)
            raise error.with_traceback(None)  # noqa: B904 (as fx does)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device):
        return device
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    return value


def move_device_constants(module: torch.nn.Module, device: "torch.device | str") -> int:
    """Point every ``device=`` constant in the graphs of ``module`` (and its graph submodules,
    such as checkpointed regions) at ``device``; returns how many nodes changed.

    >>> g = torch.fx.Graph()
    >>> _ = g.output(g.call_function(torch.ops.aten.arange.default, (3,), {"device": torch.device("cpu")}))
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> move_device_constants(gm, "meta"), gm(), gm.graph.find_nodes(op="call_function", target=torch.ops.aten.arange.default)[0].kwargs["device"]
    (1, tensor(..., device='meta', size=(3,), dtype=torch.int64), device(type='meta'))
    """
    device, changed = torch.device(device), 0
    for graph_module in (m for m in module.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in graph_module.graph.nodes:
            args, kwargs = _moved(node.args, device), {k: _moved(v, device) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
        keep_call_wrapper(graph_module)
        graph_module.recompile()
    return changed


def keep_call_wrapper(graph_module: torch.fx.GraphModule) -> None:
    """Before ``recompile``: a subclass made after the first compile (FSDP2's ``fully_shard``
    makes one) takes its base's call wrapper, as fx would otherwise give it a new one whose
    ``super().__call__`` is the base's ``call_wrapped`` again, a loop.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> gm.__class__ = type("Sub", (type(gm),), {})
    >>> keep_call_wrapper(gm); _ = gm.recompile(); gm(torch.ones(1))
    tensor([1.])
    """
    cls = type(graph_module)
    inherited = next((vars(c)["_wrapped_call"] for c in cls.__mro__[1:] if "_wrapped_call" in vars(c)), None)
    if "_wrapped_call" not in vars(cls) and inherited is not None:
        cls._wrapped_call = inherited


def _retargeted(value: Any, old: torch.dtype, new: torch.dtype, adapter_cast: bool) -> Any:
    if isinstance(value, torch.dtype):
        return new if value == old or (adapter_cast and value.is_floating_point) else value
    if isinstance(value, float) and value in (torch.finfo(old).min, torch.finfo(old).max):
        return torch.finfo(new).min if value < 0 else torch.finfo(new).max  # mask fill values
    if isinstance(value, (list, tuple)):
        return type(value)(_retargeted(v, old, new, adapter_cast) for v in value)
    return value


def retarget_dtype_constants(module: torch.nn.Module, old: torch.dtype, new: torch.dtype) -> int:
    """After converting weights from ``old`` to ``new``, make the graphs of ``module`` compute
    in ``new``: every ``old`` dtype constant (and ``finfo(old).min``/``max`` fill value) becomes
    ``new``'s, and so do the casts adapters make (their weights were converted too). Casts to
    other dtypes stay: a bf16 graph's deliberate fp32 upcasts stay fp32 when it becomes fp16.
    A graph captured in fp32 cannot tell its deliberate fp32 upcasts (RMSNorm, softmax) from
    casts that follow the data, so converted to bf16 it computes in bf16 throughout.

    >>> g = torch.fx.Graph()
    >>> _ = g.output(g.call_function(torch.ops.aten.zeros.default, ([2],), {"dtype": torch.float32}))
    >>> gm = torch.fx.GraphModule(torch.nn.Module(), g)
    >>> retarget_dtype_constants(gm, torch.float32, torch.bfloat16), gm().dtype
    (1, torch.bfloat16)
    """
    changed = 0
    for graph_module in (m for m in module.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in graph_module.graph.nodes:
            adapter_cast = is_fxpeft_node(node)
            args = _retargeted(node.args, old, new, adapter_cast)
            kwargs = {k: _retargeted(v, old, new, adapter_cast) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
        keep_call_wrapper(graph_module)
        graph_module.recompile()
    return changed

