"""Export one adapter as the plain PEFT LoRA folder that vLLM-style servers load:
``fxpeft.export_lora`` (and ``fxpeft export --for vllm``).

What such a server reads (vLLM's ``PEFTHelper`` and ``LoRAConfig``): ``lora_A`` / ``lora_B``
of linear layers only, one global ``r`` and ``lora_alpha`` (no ``rank_pattern``), ``r`` one of
1, 8, 16, 32, 64, 128, 256, 320, 512 and at most the server's ``max_lora_rank``, no DoRA, no
``modules_to_save``, no bias. So whatever the kind, the export works on the dense change of each
adapted weight, ``dW = merged - base`` (the kind's own merger computes it, so AdaLoRA's E vectors,
DoRA's magnitudes at this base weight, IA3's vectors and LoRA's scale are all in it; it merges
into fp32 copies of the base weights, so a bf16 base does not round ``dW``), and writes
its SVD: ``lora_B = U S``, ``lora_A = V^T``, ``lora_alpha = r`` (scale 1, every module's own
scale folded into its ``lora_B``), truncated to ``r`` singular values where ``dW`` has more, and
padded with zeros where it has fewer. ``r`` is the smallest allowed value that holds every
module's rank, capped at ``max_rank``. PEFT's ``convert_to_lora`` does the same SVD per module;
it does not pad to one ``r`` and refuses a rank above the weight's size.

Each module's error, ``dW - lora_B @ lora_A``, is measured and returned (max-abs and relative
Frobenius norm). A LoRA of rank at most ``r`` exports exactly (float rounding); DoRA, IA3, OFT,
BOFT, LoHa, LoKr and VeRA change a weight by up to full rank, exactly only where ``r`` covers it.

Refused, by name, before anything is written: a kind that cannot merge (prompts, prefixes,
bottleneck adapters), a kind whose merged weights are not a change of the adapted layers'
(``AdapterKind.no_weight_delta``: ``modules_to_save``), and a change to anything but a linear
layer's weight (a bias, an embedding table, a convolution). The folder is written atomically
(``fxpeft.io.folders.replace_folder``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from fxpeft import registry
from fxpeft.capture.linear_sites import LinearSite
from fxpeft.capture.quantized import base_weight
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import adapter_names
from fxpeft.io.folders import CONFIG, WEIGHTS, replace_folder
from fxpeft.io.serialize import config_header
from fxpeft.names import DEFAULT_ADAPTER, PEFT_PREFIX, AdapterNode, adapter_node
from fxpeft.runtime.apply import program_of
from fxpeft.transforms.merge import merged_weights

log = logging.getLogger("fxpeft")

# vLLM's ``MaxLoRARanks`` (vllm/config/lora.py): the only ranks a server may be started with.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_FP32_ROUNDING = 2.0 ** -23  # fp32 machine epsilon: the merged weights are fp32 (or narrower)


@dataclass(frozen=True)
class ModuleError:
    """One module's export: the rank of its ``dW`` and how far ``lora_B @ lora_A`` is from
    it (max-abs, and Frobenius norm relative to ``dW``'s; 0 for a zero ``dW``)."""

    rank: int
    max_abs: float
    relative: float


@dataclass(frozen=True)
class LoraExport:
    """What ``export_lora`` wrote: the folder, its global ``r`` (= ``lora_alpha``) and the error
    per module path."""

    folder: Path
    r: int
    modules: dict[str, ModuleError] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        """The largest relative Frobenius error of any module."""
        return max((e.relative for e in self.modules.values()), default=0.0)

    def table(self) -> str:
        """The per-module report, one line each (what ``fxpeft export`` prints)."""
        width = max((len(p) for p in self.modules), default=6)
        lines = [f"{'module':<{width}}  rank  max-abs dW error  relative Frobenius"]
        lines += [f"{path:<{width}}  {e.rank:>4}  {e.max_abs:>16.3e}  {e.relative:>18.3e}"
                  for path, e in self.modules.items()]
        return "\n".join(lines)


def _records(gm: torch.fx.GraphModule, adapter: str) -> list[AdapterNode]:
    records = [r for n in gm.graph.nodes if (r := adapter_node(n)) is not None and r.adapter == adapter]
    if not records:
        known = ", ".join(adapter_names(gm)) or DEFAULT_ADAPTER
        raise FxpeftError(f"export_lora: no adapter {adapter!r} in the graph; it has {known}")
    return records


def _check_kinds(records: list[AdapterNode]) -> None:
    """Refuse, naming kind, adapter and module, what a plain LoRA cannot carry."""
    for record in records:
        kind = registry.get(record.kind)
        reason = kind.merge if isinstance(kind.merge, str) else kind.no_weight_delta
        if reason is not None:
            raise FxpeftError(f"export_lora: the {record.kind} adapter {record.adapter!r} at "
                              f"{record.module_path} cannot become a LoRA: {reason}")


def site_deltas(gm: torch.fx.GraphModule, adapter: str) -> dict[str, tuple[LinearSite, torch.Tensor]]:
    """Module path -> (its linear site, ``dW`` laid out ``[out, in]``, fp64): what ``adapter``
    changes, from its kinds' mergers.

    >>> import torch, fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 3)), fxpeft.rules.Rule(
    ...     where=fxpeft.rules.Where(path=["0"])))
    >>> {path: delta.shape for path, (site, delta) in site_deltas(gm, "default").items()}
    {'0': torch.Size([3, 4])}
    """
    _check_kinds(_records(gm, adapter))
    try:
        targets = merged_weights(gm, {adapter})
        # again, into fp32 copies: a half-precision merge would round dW to the base's precision
        weights = merged_weights(gm, {adapter}, {t: base_weight(gm, t).float() for t in targets})
    except FxpeftError as err:
        raise FxpeftError(f"export_lora: {err}") from err
    sites = {site.weight_target: site for site in program_of(gm).sites}
    deltas = {}
    for target, merged in weights.items():
        site = sites.get(target)
        if site is None:
            raise FxpeftError(f"export_lora: adapter {adapter!r} changes {target}, which is not a "
                              f"linear layer's weight; a LoRA folder for vLLM-style servers holds "
                              f"only linear layers' lora_A and lora_B")
        delta = merged.detach().double() - base_weight(gm, target).double()
        deltas[site.module_path] = (site, delta.T if site.fan_in_fan_out else delta)
    return deltas


def _rank(delta: torch.Tensor, singular: torch.Tensor, base: torch.Tensor) -> int:
    """The rank of ``dW`` above fp32 rounding of the merged weight (``merged - base`` carries
    noise of the base weight's size, not ``dW``'s)."""
    if singular.numel() == 0:
        return 0
    scale = max(float(singular[0]), float(base.double().norm()) / min(delta.shape) ** 0.5)
    return int((singular > max(delta.shape) * _FP32_ROUNDING * scale).sum())


def _factors(delta: torch.Tensor, r: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A [r, in], lora_B [out, r])`` in fp32: the top ``min(r, rank)`` singular
    triplets of ``dW``, singular values in B; zero rows and columns past ``dW``'s rank (the
    rest is rounding noise)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(r, rank)
    lora_a = torch.zeros(r, delta.shape[1], dtype=torch.float64)
    lora_b = torch.zeros(delta.shape[0], r, dtype=torch.float64)
    lora_a[:kept], lora_b[:, :kept] = vh[:kept], u[:, :kept] * s[:kept]
    return lora_a.float().contiguous(), lora_b.float().contiguous()


def _error(delta: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> ModuleError:
    gap = delta - lora_b.double() @ lora_a.double()
    norm = float(delta.norm())
    return ModuleError(rank, float(gap.abs().max()) if gap.numel() else 0.0,
                       float(gap.norm()) / norm if norm > 0 else 0.0)


def vllm_rank(needed: int, max_rank: int) -> int:
    """The global ``r``: the smallest of vLLM's ranks that holds ``needed``, at most
    ``max_rank`` (then the largest allowed rank below it: modules get truncated).

    >>> vllm_rank(3, 64), vllm_rank(40, 64), vllm_rank(100, 64), vllm_rank(0, 16), vllm_rank(9, 10)
    (8, 64, 64, 1, 8)
    """
    allowed = [r for r in VLLM_RANKS if r <= max_rank]
    if not allowed:
        raise FxpeftError(f"export_lora: max_rank = {max_rank}; vLLM's ranks are "
                          f"{', '.join(map(str, VLLM_RANKS))}")
    return next((r for r in allowed if r >= needed), allowed[-1])


def _config(gm: torch.fx.GraphModule, r: int, deltas: dict) -> dict:
    """A plain LoraConfig: scale ``lora_alpha / r = 1``, no per-module patterns."""
    fan_in_fan_out = any(site.fan_in_fan_out for site, _ in deltas.values())
    return {**config_header(program_of(gm), "LORA"), "r": r, "lora_alpha": r,
            "target_modules": sorted(deltas), "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True}


def export_lora(gm: torch.fx.GraphModule, folder: "str | Path", max_rank: int = 64,
                adapter: str = DEFAULT_ADAPTER) -> LoraExport:
    """Write ``adapter`` of ``gm`` to ``folder`` as a plain PEFT LoRA that vLLM-style servers
    accept (see the module docstring); returns the rank and the error per module.

    >>> import tempfile, torch, fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 3)), fxpeft.rules.Rule(
    ...     where=fxpeft.rules.Where(path=["0"]), params=fxpeft.rules.LoraParams(r=2, init="random")))
    >>> done = fxpeft.export_lora(gm, tempfile.mkdtemp() + "/vllm", max_rank=16)
    >>> done.r, done.worst < 1e-6, sorted(p.name for p in done.folder.iterdir())
    (8, True, ['adapter_config.json', 'adapter_model.safetensors'])
    """
    deltas = site_deltas(gm, adapter)
    bases = {path: base_weight(gm, site.weight_target) for path, (site, _) in deltas.items()}
    ranks = {path: _rank(delta, torch.linalg.svdvals(delta), bases[path])
             for path, (_, delta) in deltas.items()}
    r = vllm_rank(max(ranks.values(), default=1), max_rank)
    tensors, errors = {}, {}
    for path, (_, delta) in deltas.items():
        lora_a, lora_b = _factors(delta, r, ranks[path])
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_b
        errors[path] = _error(delta, lora_a, lora_b, ranks[path])
    config = json.dumps(_config(gm, r, deltas), indent=2, sort_keys=True)
    replace_folder(Path(folder), {
        WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG: lambda p: p.write_text(config, encoding="utf-8")})
    done = LoraExport(Path(folder), r, errors)
    log.info("export_lora: %s: r = %d, %d modules, worst relative error %.3g", folder, r,
             len(errors), done.worst)
    return done
