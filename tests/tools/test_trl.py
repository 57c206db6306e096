"""TRL's trainers on an fxpeft graph (trl pinned in the test extra): ``SFTTrainer`` (padded,
``packing=True``, ``padding_free=True``: the last two send packed rows with restarting
``position_ids`` and no attention mask) and ``DPOTrainer`` with ``fxpeft.with_adapter_checkpoints``, a tokenizer built offline, TRL's defaults
otherwise (gradient checkpointing on, its fused LM head calling ``gm.base_model``). Checkpoints
hold only the adapter, in PEFT's layout; resuming continues the loss curve exactly."""

import json

import pytest
import torch

import fxpeft
from conftest import tiny_llama, word_texts, word_tokenizer
from fxpeft.registry import is_adapter_parameter

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS = 4
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml"}
TRAINER_FILES = {"optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json",
                 "training_args.bin", "tokenizer.json", "tokenizer_config.json"}


def _sft_data():
    return datasets.Dataset.from_dict({"text": word_texts(4, words=12, seed=1) * 8})


def _dpo_data():
    prompts, chosen, rejected = (word_texts(4, words=n, seed=s) for n, s in ((6, 1), (4, 2), (4, 3)))
    return datasets.Dataset.from_dict({"prompt": prompts * 4, "chosen": chosen * 4, "rejected": rejected * 4})


# SFT variants: their SFTConfig options (padding-free without packing enforces no max_length)
SFT = {"sft": dict(max_length=32), "sft_packed": dict(max_length=32, packing=True),
       "sft_padding_free": dict(max_length=None, padding_free=True)}


def _trainer(kind, out, **extra):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml").train()
    common = dict(per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2, logging_steps=1,
                  save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0)
    if kind in SFT:
        args = trl.SFTConfig(str(out), **SFT[kind], **common, **extra)
        trainer = fxpeft.with_adapter_checkpoints(trl.SFTTrainer)(
            model=gm, args=args, train_dataset=_sft_data(), processing_class=word_tokenizer("right"))
    else:
        args = trl.DPOConfig(str(out), **common, **extra)
        trainer = fxpeft.with_adapter_checkpoints(trl.DPOTrainer)(
            model=gm, ref_model=fxpeft.reference_model(gm), args=args, train_dataset=_dpo_data(),
            processing_class=word_tokenizer("right"))
    return gm, trainer


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module", params=[*SFT, "dpo"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    gm, trainer = _trainer(request.param, out)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    trainer.train()
    return request.param, out, gm, trainer, before


def test_the_adapters_move_and_the_losses_are_finite_and_fall(trained):
    kind, _, gm, trainer, before = trained
    assert gm.is_gradient_checkpointing  # TRL's default, run by the checkpointing pass
    moved = [n for n, p in gm.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all(is_adapter_parameter(n) for n in before)
    assert sorted(moved) == sorted(n for n in before if "lora_B" in n or "lora_A" in n)
    losses = _losses(trainer)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    if kind == "dpo":  # the reference is the base model: policy == reference at init
        assert losses[0] == pytest.approx(0.6931, abs=1e-4)


def test_packed_variants_send_packed_rows(trained):
    kind, _, _, trainer, _ = trained
    if kind not in ("sft_packed", "sft_padding_free"):
        pytest.skip("padded batches")
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert (batch["position_ids"][0, 1:] == 0).any()  # several sequences in the row


def test_checkpoints_hold_only_the_adapter_that_peft_reads(trained):
    from peft import PeftModel
    _, out, gm, _, _ = trained
    for step in (2, STEPS):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert ADAPTER_FILES <= files and files - ADAPTER_FILES <= TRAINER_FILES
    config = json.loads((out / f"checkpoint-{STEPS}" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    loaded = fxpeft.load(tiny_llama(), out / f"checkpoint-{STEPS}")
    final = fxpeft.adapter_state_dict(gm)
    assert all(torch.equal(t, final[k]) for k, t in fxpeft.adapter_state_dict(loaded).items())
    # (gm itself now runs under the trainer's bf16 autocast: TRL's default, accelerate's wrapper)
    peft_model = PeftModel.from_pretrained(tiny_llama(), out / f"checkpoint-{STEPS}").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(peft_model(ids).logits, loaded(ids).logits, rtol=0, atol=1e-5)


def test_resume_continues_the_loss_curve_exactly(trained, tmp_path):
    kind, out, _, trainer, _ = trained
    _, resumed = _trainer(kind, tmp_path)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    recomputed = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 2]
    assert len(recomputed) == STEPS - 2 and recomputed == _losses(trainer)[2:]


def test_the_reference_model_shares_the_base_and_adds_no_tensor():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    ref = fxpeft.reference_model(gm)
    base = {id(p) for n, p in gm.named_parameters() if not is_adapter_parameter(n)}
    assert {id(p) for p in ref.parameters()} == base  # the memory it adds: no tensor at all
    assert not any(n.meta.get("fxpeft_adapter") for n in ref.graph.nodes)
    assert ref.adapter_names == [] and not ref.training
    ids = torch.tensor([[5, 6, 7]])
    with gm.disable_adapters():
        torch.testing.assert_close(ref(ids).logits, gm.eval()(ids).logits, rtol=0, atol=0)
