"""VeLoRA (PEFT's ``velora_config``): loads, saves back and merges as PEFT's (its vector kept
under PEFT's key); in training its A projection is one graph node whose backward is VeLoRA's
compressed one, with PEFT's gradients and PEFT's vector updates for every init type; and it
keeps the guarantees of LoRA (identity at init, the graph, gradients only on adapters, named
adapters, torch.compile(fullgraph=True))."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import KasaConfig, VeloraConfig
from safetensors.torch import load_file

import fxpeft
from conftest import adapter_nodes, tiny_llama, token_batch
from fxpeft.errors import FxpeftError
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.graph.records import adapter_parameters
from fxpeft.kinds import velora
from fxpeft.registry import low_rank_branch
from fxpeft.rules import LoraParams, Rule, Where
from kind_checks import check_compiles, check_generate, check_named_adapters
from peft_io import perturb_adapters
from peft_models import custom_model

INITS = ("random", "batch_average", "batch_average_once")
WEIGHTS = "adapter_model.safetensors"


def base(dtype=torch.float32):
    """PEFT's MLP without its base dropout, so training steps are deterministic."""
    model = custom_model("MLP").to(dtype)
    model.drop.p = 0.0
    return model


def batch(seed, dtype=torch.float32):
    """Tokens ``(batch, seq, features)``: VeLoRA groups every token's features."""
    return torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(seed)).to(dtype)


def config(init, **extra):
    """Both linears (in 10 and in 20; 3 groups pad 10 to 12), a scale that is not 1."""
    return LoraConfig(target_modules=["lin0", "lin1"], velora_config=VeloraConfig(
        num_groups=3, scale=0.5, init_type=init), **extra)


def peft_folder(init, tmp_path, dtype=torch.float32):
    """PEFT's VeLoRA adapter, off its init (B non-zero, so A has gradients), saved."""
    torch.manual_seed(0)
    model = get_peft_model(base(dtype), config(init))
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def both(init, tmp_path, dtype=torch.float32):
    """PEFT's and fxpeft's models loaded from the same PEFT folder, in train mode."""
    folder = peft_folder(init, tmp_path, dtype)
    peft_model = PeftModel.from_pretrained(base(dtype), str(folder), is_trainable=True).train()
    return peft_model, fxpeft.load(base(dtype), folder, trainable=True).train()


def step(model, x):
    """One forward and backward; the adapter gradients by PEFT's short names."""
    model.zero_grad()
    model(x).float().square().sum().backward()
    return {_short(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def embeds(model):
    return {_short(n): b.clone() for n, b in model.named_buffers() if "velora_embed" in n}


def _short(name):
    return name.removeprefix("_orig_mod.").removeprefix("base_model.model.").replace(".default", "")


# --- load, save back, merge -------------------------------------------------------------------

@pytest.mark.parametrize("init", INITS)
def test_a_peft_folder_loads_saves_back_and_merges_as_peft(tmp_path, init):
    folder = peft_folder(init, tmp_path)
    peft_model = PeftModel.from_pretrained(base(), str(folder)).eval()
    gm = fxpeft.load(base(), folder).eval()
    x = batch(1)
    with torch.no_grad():
        expected = peft_model(x)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-6)
        back = fxpeft.save(gm, tmp_path / "ours")
        theirs, ours = load_file(folder / WEIGHTS), load_file(back / WEIGHTS)
        assert ours.keys() == theirs.keys() >= {"base_model.model.lin0.lora_velora_embed"}
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        twin = PeftModel.from_pretrained(base(), str(back)).eval()
        assert twin.peft_config["default"].velora_config == peft_model.peft_config["default"].velora_config
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=1e-6)
        merged = fxpeft.merge(gm)
        torch.testing.assert_close(merged(x), peft_model.merge_and_unload()(x), rtol=0, atol=1e-6)
    assert not adapter_nodes(merged)


# --- training: PEFT's gradients and vector updates ---------------------------------------------

@pytest.mark.parametrize("init", INITS)
def test_training_gradients_and_vectors_are_peft_s(tmp_path, init):
    """Two steps on two batches: PEFT's gradients (not plain LoRA's) and PEFT's vector after
    each; ``batch_average_once`` sets it from the first batch of the loaded adapter only."""
    peft_model, gm = both(init, tmp_path)
    start = embeds(gm)
    for seed in (1, 2):
        x = batch(seed)
        theirs, ours = step(peft_model, x), step(gm, x)
        assert ours.keys() == theirs.keys() == {f"lin{i}.lora_{f}.weight" for i in (0, 1) for f in "AB"}
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
        assert embeds(gm).keys() == embeds(peft_model).keys()
        for name, vector in embeds(peft_model).items():
            torch.testing.assert_close(embeds(gm)[name], vector, rtol=1e-6, atol=1e-7)
        if seed == 1:
            first = embeds(gm)
    changed = {n for n in start if not torch.equal(start[n], embeds(gm)[n])}
    moved = {n for n in first if not torch.equal(first[n], embeds(gm)[n])}
    assert (changed, moved) == {"random": (set(), set()), "batch_average": (set(start), set(start)),
                                "batch_average_once": (set(start), set())}[init]
    exact = step(fxpeft.load(base(), _without_velora(tmp_path), trainable=True).train(), batch(2))
    assert (exact["lin0.lora_A.weight"] - ours["lin0.lora_A.weight"]).abs().max() > 1e-3
    torch.testing.assert_close(exact["lin0.lora_B.weight"], ours["lin0.lora_B.weight"])


def test_the_vector_is_taken_after_the_adapter_dropout_as_peft_s(tmp_path):
    """With ``lora_dropout`` and the same seed, PEFT's dropout masks, gradients and vectors."""
    torch.manual_seed(0)
    model = get_peft_model(base(), config("batch_average", lora_dropout=0.3))
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(base(), str(tmp_path / "peft"), is_trainable=True).train()
    gm = fxpeft.load(base(), tmp_path / "peft", trainable=True).train()
    x = batch(1)
    torch.manual_seed(5)
    theirs = step(peft_model, x)
    torch.manual_seed(5)
    ours = step(gm, x)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    vector = embeds(gm)["lin0.lora_velora_embed"]
    torch.testing.assert_close(vector, embeds(peft_model)["lin0.lora_velora_embed"], rtol=1e-6, atol=1e-7)
    assert (vector - velora.batch_vector(x, 3)).abs().max() > 1e-3  # not the undropped input's


def _without_velora(tmp_path):
    """The PEFT folder with the same weights as plain LoRA (no VeLoRA, no vector)."""
    import json
    import safetensors.torch
    folder = tmp_path / "plain"
    folder.mkdir()
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    peft_config["velora_config"] = None
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    tensors = {k: v for k, v in load_file(tmp_path / "peft" / WEIGHTS).items() if "velora" not in k}
    safetensors.torch.save_file(tensors, folder / WEIGHTS)
    return folder


def test_bf16_base_has_peft_s_vector_dtype_and_gradients(tmp_path):
    """On a bf16 base the vector is fp32 as the adapters are (PEFT casts it with them)."""
    peft_model, gm = both("batch_average", tmp_path, torch.bfloat16)
    assert gm.get_buffer("lin0.lora_velora_embed").dtype == torch.float32
    x = batch(1, torch.bfloat16)
    theirs, ours = step(peft_model, x), step(gm, x)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds(gm)["lin1.lora_velora_embed"],
                               embeds(peft_model)["lin1.lora_velora_embed"], rtol=0, atol=0)


def test_eval_and_no_grad_run_plain_a_and_leave_the_vector(tmp_path):
    gm = fxpeft.load(base(), peft_folder("batch_average", tmp_path), trainable=True)
    start = embeds(gm)
    with torch.no_grad():
        gm.train()(batch(1))
    gm.eval()(batch(1)).sum().backward()
    assert all(torch.equal(start[n], v) for n, v in embeds(gm).items())


# --- the guarantees ------------------------------------------------------------------------------

def rewritten(init="batch_average_once"):
    return fxpeft.rewrite(base(), config(init))


def test_identity_at_init_and_the_graph():
    gm, x = rewritten().eval(), batch(1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), base()(x), rtol=0, atol=0)
    gm.graph.lint()
    projections = [n for n in adapter_nodes(gm) if n.target is velora.project]
    assert sorted(n.meta["fxpeft_adapter"].module_path for n in projections) == ["lin0", "lin1"]
    assert not [n for n in adapter_nodes(gm) if n.target is torch.ops.aten.linear.default
                and "lora_A" in str(n.args[1])]
    assert gm.get_buffer("lin1.lora_velora_embed").shape == (7,)  # ceil(20 / 3)
    joins = [n for n in adapter_nodes(gm) if n.meta["fxpeft_adapter"].removable]
    assert len(joins) == 2 and not any(low_rank_branch(n.meta["fxpeft_adapter"]) for n in joins)


def test_gradients_reach_only_the_adapters_and_the_vector_never_trains():
    gm = rewritten().train()
    perturb_adapters(gm)
    gm(batch(1)).sum().backward()
    adapters = {n for n, p in gm.named_parameters() if n in fxpeft.adapter_state_dict(gm)}
    assert {n for n, p in gm.named_parameters() if p.grad is not None} == adapters
    assert len(adapters) == 4 and all(gm.get_parameter(n).grad.abs().sum() > 0 for n in adapters)
    parameters = {id(p) for p in adapter_parameters(gm, "default")}
    assert len(parameters) == 4 and not any(id(b) in parameters for b in gm.buffers())
    assert not gm.get_buffer("lin0.lora_velora_embed").requires_grad


def test_named_adapters_keep_their_own_vectors(tmp_path):
    folder = peft_folder("random", tmp_path)
    gm = fxpeft.load(base(), folder, trainable=True)
    other = fxpeft.save(rewritten("random"), tmp_path / "other")
    fxpeft.load(gm, other, adapter="other")
    assert torch.equal(gm.get_buffer("lin0.lora_velora_embed_other"),
                       load_file(other / WEIGHTS)["base_model.model.lin0.lora_velora_embed"])
    back = load_file(fxpeft.save(gm, tmp_path / "back", adapter="other") / WEIGHTS)
    assert torch.equal(back["base_model.model.lin0.lora_velora_embed"],
                       gm.get_buffer("lin0.lora_velora_embed_other"))
    gm.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(fxpeft.fuse(gm.eval())(batch(1)), gm(batch(1)), rtol=0, atol=1e-6)
    grads = step(gm.train(), batch(1))
    assert {n for n in grads} == {f"lin{i}.lora_{f}_other.weight" for i in (0, 1) for f in "AB"}
    gm.delete_adapter("other")
    assert not [n for n, _ in gm.named_buffers() if n.endswith("_other")]


def test_compiles_with_fullgraph_in_eval_and_in_training(tmp_path):
    gm = fxpeft.load(base(), peft_folder("batch_average", tmp_path), trainable=True)
    check_compiles(gm.eval(), batch(1))
    gm.train()
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    reference = fxpeft.load(base(), tmp_path / "peft", trainable=True).train()
    for seed in (1, 2):
        theirs, ours = step(reference, batch(seed)), step(compiled, batch(seed))
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(embeds(gm), embeds(reference), rtol=0, atol=0)
    torch._dynamo.reset()


# --- refusals ------------------------------------------------------------------------------------

def test_what_peft_does_not_combine_with_velora_is_refused_by_name(tmp_path):
    with pytest.raises(PeftFormatError, match="velora_config with another LoRA variant"):
        fxpeft.rewrite(base(), config("random", use_dora=True))
    with pytest.raises(FxpeftError, match="emb: VeLoRA applies to linear layers only"):
        fxpeft.rewrite(custom_model("EmbConv1D"), LoraConfig(
            target_modules=["emb"], velora_config=VeloraConfig(num_groups=2)))
    with pytest.raises(FxpeftError, match="lin0.weight: VeLoRA applies to linear layers only"):
        fxpeft.rewrite(base(), LoraConfig(target_parameters=["lin0.weight"],
                                          velora_config=VeloraConfig(num_groups=2)))
    with pytest.raises(FxpeftError, match="VeLoRA does not combine with MiCA"):
        fxpeft.rewrite(base(), LoraConfig(target_modules=["lin0"], init_lora_weights="mica", r=4,
                                          velora_config=VeloraConfig(num_groups=2)))
    with pytest.raises(FxpeftError, match="VeLoRA does not combine with KaSA"):  # PEFT: no such variant pair
        fxpeft.rewrite(base(), LoraConfig(target_modules=["lin0"], r=2, kasa_config=KasaConfig(),
                                          velora_config=VeloraConfig(num_groups=2)))
    with pytest.raises(PeftFormatError, match="velora_config.num_groups must be positive"):
        fxpeft.rewrite(base(), {"peft_type": "LORA", "target_modules": ["lin0"],
                                "velora_config": {"num_groups": 0}})


def test_rules_with_velora_on_some_layers_only_do_not_save_as_peft(tmp_path):
    rules = [Rule(where=Where(path=["lin0"]), params=LoraParams(velora="random", velora_groups=2)),
             Rule(where=Where(path=["lin1"]))]
    gm = fxpeft.rewrite(base(), rules)
    with pytest.raises(PeftFormatError, match="one velora_config"):
        fxpeft.save(gm, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# --- on a decoder ----------------------------------------------------------------------------------

def llama_config(init):
    return LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      velora_config=VeloraConfig(num_groups=4, init_type=init))


def test_on_llama_peft_s_logits_gradients_generate_and_named_adapters(tmp_path):
    """Tiny Llama, q_proj and v_proj: PEFT's logits and training gradients, PEFT's greedy
    tokens with the KV cache, and a second VeLoRA adapter beside the first (mixed rows, fuse)."""
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), llama_config("batch_average"))
    perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    gm = fxpeft.load(tiny_llama(), tmp_path / "peft", trainable=True)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=0, atol=1e-5)
    peft_model.train().zero_grad()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    gm.train()(input_ids=ids, labels=ids).loss.backward()
    theirs = {_short(n): p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    ours = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    gm.eval()
    check_generate(gm, tmp_path)
    other = fxpeft.rewrite(tiny_llama(), llama_config("random"))
    perturb_adapters(other, seed=2)
    fxpeft.load(gm, fxpeft.save(other, tmp_path / "other"), adapter="other")
    check_named_adapters(gm, tmp_path)
