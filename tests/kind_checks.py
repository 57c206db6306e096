"""Checks shared by the tests of adapter kinds (OFT, BOFT, LoHa): perturbing their parameters, PEFT
round trips, named adapters and mixed batches, generate and compile, PEFT's MLP (tests only)."""

from __future__ import annotations

import copy

import torch

import fxpeft
from conftest import VOCAB, tiny_llama

ATOL = 1e-5


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def perturb(model: torch.nn.Module, prefix: str, seed: int = 3, scale: float = 0.1) -> None:
    """Move every parameter whose name holds ``prefix`` (``oft_``) off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if prefix in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


class MLP(torch.nn.Module):
    """PEFT's custom-model ``MLP`` (``hidden`` 32: its ``MLP2``)."""

    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lin0, self.drop = torch.nn.Linear(10, hidden), torch.nn.Dropout(0.5)
        self.lin1 = torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x.float())))), dim=-1)


def mlp_input() -> torch.Tensor:
    return torch.randn(6, 10, generator=torch.Generator().manual_seed(2))


def check_both_ways(base: torch.nn.Module, peft_model: torch.nn.Module, x: torch.Tensor, tmp_path,
                    moves: bool = True) -> None:
    """PEFT's folder loads into fxpeft with PEFT's outputs, and fxpeft's folder back into PEFT."""
    from peft import PeftModel
    with torch.no_grad():
        expected = peft_model(x)  # COFT projects PEFT's parameters in place here
        peft_model.save_pretrained(tmp_path / "peft")
        gm = fxpeft.load(copy.deepcopy(base), tmp_path / "peft").eval()
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=ATOL)
        if moves:
            assert (expected - base(x)).abs().max() > 1e-4
        again = PeftModel.from_pretrained(copy.deepcopy(base), str(fxpeft.save(gm, tmp_path / "ours")))
        torch.testing.assert_close(again.eval()(x), expected, rtol=0, atol=ATOL)


def check_named_adapters(gm, tmp_path) -> None:
    """``gm`` holds ``default`` and ``other``: switching, the base under ``disable_adapters``,
    mixed rows, the fused copy, ``other`` saved alone, and deleting it."""
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for name in ("default", "other"):
        gm.set_adapter(name)
        outputs[name] = logits(gm, ids)
        torch.testing.assert_close(logits(fxpeft.fuse(gm), ids), outputs[name], rtol=0, atol=ATOL)
    with gm.disable_adapters():
        outputs["__base__"] = logits(gm, ids)
    torch.testing.assert_close(outputs["__base__"], logits(tiny_llama(), ids), rtol=0, atol=0)
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    names = ["other", "__base__", "default"]
    mixed = logits(gm, ids, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outputs[name][row], rtol=0, atol=ATOL)
    alone = fxpeft.load(tiny_llama(), fxpeft.save(gm, tmp_path / "other", adapter="other"))
    torch.testing.assert_close(logits(alone, ids), outputs["other"], rtol=0, atol=ATOL)
    gm.delete_adapter("other")
    gm.set_adapter("default")
    assert not any("_other" in n for n, _ in gm.named_parameters())
    torch.testing.assert_close(logits(gm, ids), outputs["default"], rtol=0, atol=ATOL)


def check_generate(gm, tmp_path) -> None:
    """Greedy ``fxpeft.generate`` with the KV cache gives PEFT's tokens (left padding)."""
    from peft import PeftModel
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0
    ours = fxpeft.generate(gm, ids, max_new_tokens=6, attention_mask=mask)
    twin = PeftModel.from_pretrained(tiny_llama(), str(fxpeft.save(gm, tmp_path / "a"))).eval()
    assert torch.equal(ours, twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                           do_sample=False))


def check_compiles(gm, x: torch.Tensor) -> None:
    """``torch.compile(fullgraph=True, dynamic=True)``: forward and backward, with the eager
    gradients (aot_eager: dynamo's whole graph and AOT autograd's backward, no kernel build)."""
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    gm(x).sum().backward()
    assert grads.keys() == {n for n, p in gm.named_parameters() if p.grad is not None} != set()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, gm.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def bf16_llama() -> torch.nn.Module:
    return tiny_llama().to(torch.bfloat16)


def check_bf16_both_ways(peft_model, prefix: str, tmp_path) -> None:
    """PEFT's adapter of a bf16 ``tiny_llama`` (fp32 adapter tensors, its autocast) loads into
    fxpeft, fp32 too, with PEFT's bf16 logits, and fxpeft's folder back into PEFT."""
    from peft import PeftModel
    assert {p.dtype for n, p in peft_model.named_parameters() if prefix in n} == {torch.float32}
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    gm = fxpeft.load(bf16_llama(), tmp_path / "peft")
    assert {p.dtype for n, p in gm.named_parameters() if prefix in n} == {torch.float32}
    out = logits(gm, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, logits(peft_model, ids), rtol=0, atol=1e-2)
    again = PeftModel.from_pretrained(bf16_llama(), str(fxpeft.save(gm, tmp_path / "ours"))).eval()
    torch.testing.assert_close(logits(again, ids), out, rtol=0, atol=1e-2)


def check_merge(gm, peft_config, prefix: str) -> None:
    """``fxpeft.merge`` of ``gm`` (a ``tiny_llama``'s) has the base's nodes and ``gm``'s logits,
    and the weights PEFT's ``merge_and_unload`` writes with the same adapter tensors."""
    from peft import get_peft_model
    from conftest import emitted_base
    ids = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    merged = fxpeft.merge(gm)
    merged.graph.lint()
    assert len(merged.graph.nodes) == len(emitted_base(tiny_llama()).graph.nodes)
    assert not any(prefix in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), logits(gm, ids), rtol=0, atol=ATOL)
    peft_model = get_peft_model(tiny_llama(), peft_config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if prefix in name:
                param.copy_(gm.get_parameter(name.replace("base_model.model.", "").replace(".default", "")))
    theirs = peft_model.merge_and_unload()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(merged.get_parameter(name), theirs.get_parameter(name), rtol=0, atol=1e-6)


def check_switching_compiles_once_per_state(model, gm, ids) -> torch.Tensor:
    """``gm`` (adapted from ``model``) compiled with ``fullgraph=True``: adapted outputs, the base
    model's under ``disable_adapters``, and one compile per state however often it switches.
    Returns the adapted logits. (``gm.set_adapter([])`` would also freeze the adapter's
    parameters: a guard of its own, so this switches with ``disable_adapters``.)"""
    from torch._dynamo.testing import CompileCounterWithBackend
    from conftest import emitted_base
    base = emitted_base(model).eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm.eval(), backend=counter, fullgraph=True)
    adapted = compiled(ids).logits
    torch.testing.assert_close(adapted, gm(ids).logits, rtol=0, atol=1e-5)
    for _ in range(2):
        with gm.disable_adapters():
            torch.testing.assert_close(compiled(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled(ids).logits, adapted, rtol=0, atol=0)
    assert counter.frame_count == 2  # once per state
    return adapted


def check_compiles_whole(gm, ids) -> None:
    """``gm`` compiles as one frame with ``fullgraph=True`` (no graph break), its training loss
    equals eager's, and backward reaches only adapter parameters."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from conftest import assert_only_adapters_get_grads
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    loss = torch.compile(gm.train(), backend=counter, fullgraph=True)(ids, labels=ids).loss
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, gm(ids, labels=ids).loss, rtol=0, atol=1e-5)
    loss.backward()
    assert_only_adapters_get_grads(gm)


def allocation_steps(peft_model, gm, steps, loss_of, lr: float) -> None:
    """AdaLoRA steps taken alike by both sides: PEFT's gradients (of ``loss_of(peft_model)``)
    copied to fxpeft's parameters, the same SGD update, then each side's
    ``update_and_allocate(step)``."""
    peft_model.train(), gm.train()
    ours = dict(gm.named_parameters())
    for step in steps:
        loss_of(peft_model).backward()
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if param.grad is not None:  # the adapter's: the base is frozen
                    mine = ours[name.removeprefix("base_model.model.").replace(".default", "")]
                    mine.grad = param.grad.clone()
                    param -= lr * param.grad
                    mine -= lr * mine.grad
        peft_model.base_model.update_and_allocate(step)
        gm.update_and_allocate(step)
        for param in [*ours.values(), *peft_model.parameters()]:
            param.grad = None
