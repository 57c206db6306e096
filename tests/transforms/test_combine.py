"""fxpeft.combine: PEFT 0.21.2's add_weighted_adapter, every combination type, compared on the
delta weights ΔW (not the factors); each type against arithmetic written here from the
definitions (numpy, not fxpeft's code); the cases where PEFT is wrong (rsLoRA); and the mix as an
ordinary adapter (save -> PEFT, load, merge, switch, delete)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch
from fxpeft.rules import LoraParams, Rule, Where
from fxpeft.transforms.combine import METHODS

Q, V, K = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.0.self_attn.k_proj")
DENSITY = 0.5
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _density(method: str) -> "float | None":
    return DENSITY if any(w in method for w in ("ties", "dare", "magnitude_prune")) else None


def _rule(path: str, kind: str = "lora", **params) -> Rule:
    return Rule(where=Where(path=[path]), params=fxpeft.registry.get(kind).params(**params))


def _sources(rslora: bool = False, kind: str = "lora"):
    """A one-layer Llama with adapters a (q, v; r 4, alpha 8), b (q, v; r 4, alpha 16) and
    c (q, k; r 2, alpha 3), random (DoRA magnitudes: the norms at init times 1 ± 0.2), in fxpeft."""
    base = tiny_llama(num_hidden_layers=1)
    gm = fxpeft.rewrite(copy.deepcopy(base), _rule(r"(q|v)_proj$", kind, r=4, alpha=8, use_rslora=rslora))
    gm.eval()
    fxpeft.add_adapter(gm, "b", _rule(r"(q|v)_proj$", kind, r=4, alpha=16, use_rslora=rslora))
    fxpeft.add_adapter(gm, "c", _rule(r"(q|k)_proj$", kind, r=2, alpha=3, use_rslora=rslora))
    magnitudes = {n: p.detach().clone() for n, p in gm.named_parameters() if "magnitude" in n}
    randomize_adapters(gm, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, norm in magnitudes.items():
            gm.get_parameter(name).copy_(norm * (1 + 0.2 * torch.randn(norm.shape, generator=generator)))
    return base, gm


def _into_peft(base, gm, folder):
    """The same adapters in PEFT (saved by fxpeft, loaded by PeftModel)."""
    from peft import PeftModel
    for name in ("default", "b", "c"):
        fxpeft.save(gm, folder / name, adapter=name)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folder / "default", adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(folder / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    base, gm = _sources()
    peft_model = _into_peft(base, gm, tmp_path_factory.mktemp("sources"))
    return base, gm, peft_model


@contextlib.contextmanager
def _peft_init_draws_aside():
    """PEFT draws the new adapter's initial factors (overwritten right after) from torch's
    global generator before DARE's masks; fxpeft draws only the masks. Setting that init's draws
    aside lets both draw their masks from the same seeded stream, in PEFT's order."""
    from peft.tuners.lora import LoraModel
    inject = LoraModel.inject_adapter

    def inject_aside(self, *args, **kwargs):
        with torch.random.fork_rng():
            return inject(self, *args, **kwargs)
    LoraModel.inject_adapter = inject_aside
    try:
        yield
    finally:
        LoraModel.inject_adapter = inject


def peft_mix(peft_model, weights: dict, method: str, name: str, seed: int = 3, **options) -> None:
    names = ["a" if n == "default" else n for n in weights]
    torch.manual_seed(seed)
    with _peft_init_draws_aside():
        peft_model.add_weighted_adapter(names, list(weights.values()), name, combination_type=method,
                                        density=_density(method), **options)


def peft_delta(peft_model, name: str, path: str) -> torch.Tensor:
    return peft_model.base_model.model.get_submodule(path).get_delta_weight(name).detach()


def fx_deltas(gm, adapter: str, paths=(Q, V, K)) -> dict[str, torch.Tensor]:
    """ΔW of ``adapter`` at each layer, read from ``fxpeft.merge`` (not from the factors)."""
    active = gm.active_adapters
    gm.set_adapter(adapter)
    merged = fxpeft.merge(gm)
    gm.set_adapter(active)
    return {p: (merged.get_parameter(f"{p}.weight") - gm.get_parameter(f"{p}.weight")).detach()
            for p in paths}


# --- parity with PEFT, every type ---------------------------------------------------------------

PAIRS = [({"default": 0.7, "b": -0.3}, m) for m in METHODS]
PAIRS += [({"default": 0.6, "c": 0.9}, m) for m in ("cat", *SVD)]  # different ranks and alphas


@pytest.mark.parametrize("weights,method", PAIRS, ids=[f"{m}-{'+'.join(w)}" for w, m in PAIRS])
def test_combine_equals_peft_add_weighted_adapter(both, weights, method):
    _, gm, peft_model = both
    name = f"m_{method}_{'_'.join(weights)}"
    before = len(gm.graph.nodes)
    fxpeft.combine(gm, weights, method, adapter=name, density=_density(method), seed=3)
    peft_mix(peft_model, weights, method, name)
    gm.graph.lint()
    assert len(gm.graph.nodes) > before and name in gm.adapter_names
    assert gm.active_adapters == ["default"]  # added inactive, as add_adapter does
    ours = fx_deltas(gm, name)
    for path in {Q, V} | ({K} if "c" in weights else set()):
        torch.testing.assert_close(ours[path], peft_delta(peft_model, name, path), rtol=0, atol=1e-5)
    assert ours[Q].abs().max() > 1e-3  # a real mix, not zeros
    gm.delete_adapter(name)
    assert len(gm.graph.nodes) == before


# --- each type against the definitions, in numpy ----------------------------------------------

def _factors(gm, adapter: str, path: str, scale: float):
    module = gm.get_submodule(path)
    suffix = "" if adapter == "default" else f"_{adapter}"
    lora_a = getattr(module, f"lora_A{suffix}").weight.detach().double().numpy()
    lora_b = getattr(module, f"lora_B{suffix}").weight.detach().double().numpy()
    return lora_a, lora_b, scale


def _trim(x, density):
    """TIES' trim: keep the int(density * size) entries of largest magnitude."""
    keep = np.argsort(-np.abs(x).ravel(), kind="stable")[: int(density * x.size)]
    out = np.zeros(x.size)
    out[keep] = x.ravel()[keep]
    return out.reshape(x.shape)


def _elect_mean(tensors, weights):
    """TIES' elect (sign of the summed values) and disjoint mean of the weighted agreeing entries."""
    elected = np.where(sum(tensors) >= 0, 1.0, -1.0)
    agree = [np.sign(t) == elected for t in tensors]
    total = sum(w * t * a for w, t, a in zip(weights, tensors, agree))
    return total / np.maximum(sum(a.astype(float) for a in agree), 1)


def _drops(shapes, generator):
    """DARE's keep masks, one per tensor in the order drawn (Bernoulli(density))."""
    return [torch.bernoulli(torch.full(s, DENSITY, dtype=torch.float32), generator=generator)
            .double().numpy() for s in shapes]


def reference_mix(method, tensors, weights, masks=None):
    base = method.removesuffix("_svd")
    if base in ("ties", "magnitude_prune"):
        tensors = [_trim(t, DENSITY) for t in tensors]
    if base.startswith("dare"):
        tensors = [t * m / DENSITY for t, m in zip(tensors, masks)]
    if base in ("ties", "dare_ties"):
        return _elect_mean(tensors, weights)
    return sum(w * t for w, t in zip(weights, tensors))


def reference_delta(gm, weights, method, path, generator, scales):
    sources = [_factors(gm, name, path, scales[name]) for name in weights]
    ws = list(weights.values())
    if method == "cat":
        return sum(w * s * b @ a for w, (a, b, s) in zip(ws, sources))
    if method in SVD:
        deltas = [s * b @ a for a, b, s in sources]
        masks = _drops([d.shape for d in deltas], generator) if "dare" in method else None
        total = reference_mix(method, deltas, ws, masks)
        u, sv, vt = np.linalg.svd(total)
        r = max(a.shape[0] for a, _, _ in sources)
        return (u[:, :r] * sv[:r]) @ vt[:r]
    wa = [np.sign(w * s) * np.sqrt(abs(w * s)) for w, (_, _, s) in zip(ws, sources)]
    wb = [np.sqrt(abs(w * s)) for w, (_, _, s) in zip(ws, sources)]
    mask_a = _drops([a.shape for a, _, _ in sources], generator) if "dare" in method else None
    mask_b = _drops([b.shape for _, b, _ in sources], generator) if "dare" in method else None
    lora_a = reference_mix(method, [a for a, _, _ in sources], wa, mask_a)
    lora_b = reference_mix(method, [b for _, b, _ in sources], wb, mask_b)
    return lora_b @ lora_a


@pytest.mark.parametrize("method", METHODS)
def test_combine_matches_the_definitions(both, method):
    _, gm, _ = both
    weights, scales = {"default": 0.7, "b": -0.3}, {"default": 2.0, "b": 4.0}
    fxpeft.combine(gm, weights, method, adapter="ref", density=_density(method),
                   generator=torch.Generator().manual_seed(5))
    ours = fx_deltas(gm, "ref")
    generator = torch.Generator().manual_seed(5)  # draws: layer by layer, in graph order
    for path in (Q, V):
        expected = reference_delta(gm, weights, method, path, generator, scales)
        np.testing.assert_allclose(ours[path].double().numpy(), expected, rtol=0, atol=1e-5)
    gm.delete_adapter("ref")


# --- where PEFT 0.21.2 is wrong: rsLoRA ---------------------------------------------------------

def test_rslora_mix_is_right_where_peft_scales_it_by_sqrt_r(tmp_path):
    base, gm = _sources(rslora=True)
    peft_model = _into_peft(base, gm, tmp_path)
    weights = {"default": 0.7, "b": 0.3}
    scales = {"default": 8 / 2.0, "b": 16 / 2.0}  # alpha / sqrt(r), r = 4
    for method, new_rank in (("cat", 8), ("svd", 4), ("linear", 4)):
        fxpeft.combine(gm, weights, method, adapter=method)
        peft_mix(peft_model, weights, method, method)
        expected = reference_delta(gm, weights, method, Q, None, scales)
        ours = fx_deltas(gm, method)[Q].double().numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
        # PEFT gives the mix the first source's use_rslora with lora_alpha = r: scale sqrt(r), not 1
        theirs = peft_delta(peft_model, method, Q).double().numpy()
        np.testing.assert_allclose(theirs, expected * new_rank ** 0.5, rtol=1e-5, atol=1e-5)


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "zz": 1.0}, "cat"), "no adapter 'zz'"),
    (lambda gm: fxpeft.combine(gm, {}, "cat"), "non-empty mapping"),
    (lambda gm: fxpeft.combine(gm, {"default": float("nan"), "b": 1.0}, "cat"), "finite number"),
    (lambda gm: fxpeft.combine(gm, {"default": True, "b": 1.0}, "cat"), "finite number"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "tie"), "method 'tie' is unknown"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "ties"), "needs density"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "ties", density=1.5), "needs density"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "cat", density=0.5), "density applies"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "ties", density=0.5,
                               majority_sign_method="mean"), "majority_sign_method"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "svd", svd_rank=0), "svd_rank"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "cat", adapter="b"), "already exists"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "c": 1.0}, "linear"), "needs equal ranks"),
    (lambda gm: fxpeft.combine(gm, {"default": 1.0, "b": 1.0}, "cat", seed=1,
                               generator=torch.Generator()), "seed or generator"),
])
def test_bad_calls_are_one_line_errors_and_change_nothing(both, call, message):
    _, gm, _ = both
    names, nodes = gm.adapter_names, len(gm.graph.nodes)
    with pytest.raises(fxpeft.FxpeftError, match=message) as caught:
        call(gm)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("combine: ")
    assert gm.adapter_names == names and len(gm.graph.nodes) == nodes


def test_other_kinds_and_mixed_kinds_are_refused_by_name():
    gm = fxpeft.rewrite(tiny_llama(num_hidden_layers=1), "ia3")
    fxpeft.add_adapter(gm, "lora", _rule(r"q_proj$"))
    with pytest.raises(fxpeft.FxpeftError, match=r"adapter 'default' is a ia3 adapter; combine "
                                                 r"mixes adapters of one low-rank kind \(lora, dora\)"):
        fxpeft.combine(gm, {"default": 0.5, "lora": 0.5}, "cat")
    fxpeft.add_adapter(gm, "dora", _rule(r"q_proj$", kind="dora"))
    with pytest.raises(fxpeft.FxpeftError, match=r"different kinds \({'lora': 'lora', 'dora': 'dora'}\)"):
        fxpeft.combine(gm, {"lora": 0.5, "dora": 0.5}, "svd")


# --- the mix is an ordinary adapter -------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(both):
    base, gm, _ = both
    fxpeft.combine(gm, {"default": 0.7, "b": 0.3, "c": 0.5}, "cat", adapter="mix")
    return base, gm


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_saved_mix_loads_in_peft_and_fxpeft_with_equal_outputs(mixed, tmp_path):
    from peft import PeftModel
    base, gm = mixed
    ids = token_batch()
    gm.set_adapter("mix")
    ours = _logits(gm, ids)
    gm.set_adapter("default")
    folder = fxpeft.save(gm, tmp_path / "mix", adapter="mix")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(_logits(peft_model, ids), ours, rtol=0, atol=1e-5)
    again = fxpeft.load(copy.deepcopy(base), folder)
    torch.testing.assert_close(_logits(again, ids), ours, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, _logits(base, ids), atol=1e-4)


def test_mix_merges_switches_trains_and_deletes(mixed):
    _, gm = mixed
    ids = token_batch()
    default = _logits(gm, ids)
    gm.set_adapter("mix")
    mix = _logits(gm, ids)
    assert not torch.allclose(mix, default, atol=1e-4)
    torch.testing.assert_close(_logits(fxpeft.merge(gm), ids), mix, rtol=0, atol=1e-5)
    gm.train()
    gm(ids).logits.sum().backward()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads and all("_mix" in n for n in grads)  # only the active mix trains
    gm.zero_grad(set_to_none=True)
    gm.eval()
    gm.set_adapter("default")
    torch.testing.assert_close(_logits(gm, ids), default, rtol=0, atol=0)
    nodes = len(gm.graph.nodes)
    gm.delete_adapter("mix")
    gm.graph.lint()
    assert "mix" not in gm.adapter_names and len(gm.graph.nodes) < nodes
    assert not [n for n, _ in gm.named_parameters() if "_mix" in n]


# --- where PEFT 0.21.2 is wrong: DoRA magnitudes ------------------------------------------------

def _dora_delta(gm, adapter, path, scale):
    """A DoRA adapter's whole ΔW = m / ||W + sBA|| (W + sBA) - W, by rows, from its definition."""
    module = gm.get_submodule(path)
    suffix = "" if adapter == "default" else f"_{adapter}"
    weight = module.weight.detach().double().numpy()
    lora_a, lora_b, _ = _factors(gm, adapter, path, scale)
    magnitude = getattr(module, f"lora_magnitude_vector{suffix}").detach().double().numpy()
    updated = weight + scale * lora_b @ lora_a
    gain = magnitude / np.linalg.norm(updated, axis=1)
    return gain[:, None] * updated - weight, gain


def dora_reference(gm, weights, method, path, scales):
    """cat: Σ wᵢ ΔWᵢ; svd: its truncated SVD (rank 32). linear: PEFT's factor mix of the
    gain-scaled branches gᵢBᵢ, plus the magnitude changes mixed linearly: D W + C with
    d = Σ wᵢ(gᵢ - 1)."""
    parts = {n: _dora_delta(gm, n, path, scales[n]) for n in weights}
    total = sum(w * parts[n][0] for n, w in weights.items())
    if method in ("cat", "svd"):
        u, sv, vt = np.linalg.svd(total)
        return total if method == "cat" else (u[:, :32] * sv[:32]) @ vt[:32]
    weight = gm.get_submodule(path).weight.detach().double().numpy()
    roots = {n: w * scales[n] for n, w in weights.items()}
    lora_a = sum(np.sign(x) * np.sqrt(abs(x)) * _factors(gm, n, path, 0)[0] for n, x in roots.items())
    lora_b = sum(np.sqrt(abs(x)) * parts[n][1][:, None] * _factors(gm, n, path, 0)[1]
                 for n, x in roots.items())
    shift = sum(w * (parts[n][1] - 1) for n, w in weights.items())
    return shift[:, None] * weight + lora_b @ lora_a


def peft_effective_delta(peft_model, name, path):
    """What PEFT's adapter ``name`` really adds to the weight (merged, then unmerged)."""
    layer = peft_model.base_model.model.get_submodule(path)
    before = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=[name])
    after = layer.base_layer.weight.detach().clone()
    layer.unmerge()
    return (after - before).double().numpy()


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    base, gm = _sources(kind="dora")
    return base, gm, _into_peft(base, gm, tmp_path_factory.mktemp("dora"))


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_dora_mix_is_right_where_peft_drops_the_magnitudes(dora, method):
    base, gm, peft_model = dora
    weights, scales = {"default": 0.7, "b": 0.3}, {"default": 2.0, "b": 4.0}
    name = f"dora_{method}"
    fxpeft.combine(gm, weights, method, adapter=name, svd_rank=32 if method == "svd" else None)
    peft_mix(peft_model, weights, method, name, svd_rank=32 if method == "svd" else None)
    ours = fx_deltas(gm, name)
    for path in (Q, V):
        expected = dora_reference(gm, weights, method, path, scales)
        np.testing.assert_allclose(ours[path].double().numpy(), expected, rtol=0, atol=1e-5)
        theirs = peft_effective_delta(peft_model, name, path)  # magnitudes from init, not mixed
        assert np.abs(theirs - expected).max() > 0.05 * np.abs(expected).max()
    gm.delete_adapter(name)


def test_dora_mix_saves_and_loads_in_peft_with_equal_outputs(dora, tmp_path):
    from peft import PeftModel
    base, gm, _ = dora
    fxpeft.combine(gm, {"default": 0.5, "b": 0.5, "c": -0.4}, "cat", adapter="dmix")
    gm.set_adapter("dmix")
    ids = token_batch()
    ours = _logits(gm, ids)
    gm.set_adapter("default")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), fxpeft.save(gm, tmp_path / "d", "dmix"))
    torch.testing.assert_close(_logits(peft_model.eval(), ids), ours, rtol=0, atol=1e-5)
    gm.delete_adapter("dmix")


def test_svd_rank_above_a_layers_size_pads_where_peft_mismatches_the_factors(both):
    _, gm, peft_model = both
    weights = {"default": 0.7, "b": 0.3}
    fxpeft.combine(gm, weights, "svd", adapter="wide", svd_rank=40)  # v_proj is 32 x 64
    fxpeft.combine(gm, weights, "cat", adapter="exact")
    wide, exact = fx_deltas(gm, "wide"), fx_deltas(gm, "exact")
    for path in (Q, V):
        torch.testing.assert_close(wide[path], exact[path], rtol=0, atol=1e-5)
    peft_mix(peft_model, weights, "svd", "wide", svd_rank=40)
    layer = peft_model.base_model.model.get_submodule(V)
    assert layer.lora_A["wide"].weight.shape[0] != layer.lora_B["wide"].weight.shape[1]  # 64 vs 32
    gm.delete_adapter("wide")
    gm.delete_adapter("exact")


class Layers(torch.nn.Module):
    """An embedding (stored [in, out]: PEFT draws DARE's masks on its ΔW transposed), a 3x3
    convolution and a linear, defined in another order than they run (PEFT draws in definition
    order); control flow on the input makes fxpeft capture it with torch.export, which keeps
    that order."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 12)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if ids.dim() == 1:
            ids = ids[None]
        return self.head(self.emb(ids)).sum() + self.conv(image).sum()


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "dare_linear_svd", "dare_ties"])
def test_embeddings_and_convolutions_combine_as_in_peft(tmp_path, method):
    from peft import PeftModel
    torch.manual_seed(0)
    net, paths = Layers().eval(), ("emb", "conv", "head")
    rules = [Rule(match=match, where=Where(path=[f"^{path}$"]), params=LoraParams(r=4, alpha=8))
             for match, path in zip(("embedding", "conv", "linear"), paths)]
    inputs = (torch.arange(6).view(2, 3), torch.randn(2, 3, 5, 5))
    gm = fxpeft.rewrite(copy.deepcopy(net), rules, example_inputs=inputs)
    assert gm.capture_info.frontend == "export"
    fxpeft.add_adapter(gm, "b", rules, alpha=6)
    randomize_adapters(gm, seed=4)
    fxpeft.save(gm, tmp_path / "a")
    fxpeft.save(gm, tmp_path / "b", adapter="b")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    weights = {"default": 0.8, "b": -0.5}
    fxpeft.combine(gm, weights, method, adapter="mix", density=_density(method), seed=3)
    peft_mix(peft_model, weights, method, "mix")
    ours = fx_deltas(gm, "mix", paths)
    for path in paths:
        torch.testing.assert_close(ours[path], peft_delta(peft_model, "mix", path), rtol=0, atol=1e-5)


class UsesParameter(torch.nn.Module):
    """``x @ W`` on a bare parameter of a submodule (PEFT's target_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.weight = torch.nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return x @ self.inner.weight


def test_lora_on_a_bare_parameter_is_refused_as_peft_refuses_it():
    rule = Rule(match="parameter", where=Where(path=[r"inner\.weight$"]), params=LoraParams(r=2))
    gm = fxpeft.rewrite(UsesParameter(), rule)
    fxpeft.add_adapter(gm, "b", rule)
    with pytest.raises(fxpeft.FxpeftError, match=r"combine: adapter '\w+' at inner.weight: .*not a plain "
                                                 r"low-rank branch .*parameter read"):
        fxpeft.combine(gm, {"default": 0.5, "b": 0.5}, "cat")
    assert gm.adapter_names == ["default", "b"]


@pytest.mark.parametrize("kind, match, path, params", [
    ("lora", "linear", "head", {"lora_bias": True}),  # PEFT mixes no biases: silently wrong
    ("dora", "conv", "conv", {}),
    ("dora", "embedding", "emb", {}),
], ids=["lora_bias", "dora-conv", "dora-embedding"])
def test_what_no_row_gain_or_factor_mix_describes_is_refused_by_site(kind, match, path, params):
    rule = Rule(match=match, where=Where(path=[f"^{path}$"]),
                params=fxpeft.registry.get(kind).params(r=2, alpha=4, **params))
    inputs = (torch.arange(6).view(2, 3), torch.randn(2, 3, 5, 5))
    gm = fxpeft.rewrite(Layers().eval(), rule, example_inputs=inputs)
    fxpeft.add_adapter(gm, "b", rule)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    with pytest.raises(fxpeft.FxpeftError, match=rf"^combine: adapter '\w+' at {path}: its {kind} "
                                                 r"update there is not a plain low-rank branch"):
        fxpeft.combine(gm, {"default": 0.5, "b": 0.5}, "cat")
    assert gm.adapter_names == ["default", "b"]
    assert all(torch.equal(p, before[n]) for n, p in gm.named_parameters())
