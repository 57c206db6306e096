"""fxpeft.Trainer: checkpoints are PEFT adapter folders, evaluation runs inside the Trainer, and
resuming continues the uninterrupted run's loss curve exactly."""

import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainingArguments

import fxpeft
from conftest import randomize_adapters, tiny_llama, token_batch
from fxpeft.io.serialize import restore

STEPS, SAVE_EVERY = 6, 3
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "fxpeft_rules.toml"}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "training_args.bin"}
DATA = [{"input_ids": row, "labels": row} for row in token_batch(16, 16)]


def _trainer(gm, output_dir, **overrides):
    """4 steps an epoch (16 rows, batch 4), so a checkpoint at step 3 is mid-epoch; lora_qv's
    dropout (0.05) stays on, so resuming must restore the RNG too."""
    args = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4,
                learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=SAVE_EVERY,
                report_to=[], use_cpu=True, seed=42, disable_tqdm=True)
    return fxpeft.Trainer(model=gm, args=TrainingArguments(**{**args, **overrides}),
                          train_dataset=DATA, eval_dataset=DATA[:8])


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    trainer = _trainer(gm, out)
    trainer.train()
    return gm, trainer, out


def test_checkpoints_hold_the_adapter_not_the_model(uninterrupted):
    gm, _, out = uninterrupted
    assert sorted(os.listdir(out)) == [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{STEPS}"]
    for step in (SAVE_EVERY, STEPS):
        assert set(os.listdir(out / f"checkpoint-{step}")) == ADAPTER_FILES | TRAINER_FILES
    saved = load_file(out / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert len(saved) == 2 * 2 * 2  # A and B, q and v, 2 layers: no base weight
    ours = fxpeft.adapter_state_dict(gm)
    assert sorted(t.numel() for t in saved.values()) == sorted(t.numel() for t in ours.values())
    reloaded = fxpeft.load(tiny_llama(), out / f"checkpoint-{STEPS}")  # the final weights
    ids = token_batch(2, 9, seed=3)
    expected = gm.eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out / f"checkpoint-{STEPS}")).eval()
    # PEFT's modules vs our graph: the same math, other kernels' rounding (test_peft_format's 1e-5).
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_resume_restores_adapter_optimizer_scheduler_and_continues_the_curve(uninterrupted, tmp_path):
    gm, trainer, out = uninterrupted
    fresh = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    randomize_adapters(fresh, seed=7)  # so only a restored adapter can give the same curve
    resumed = _trainer(fresh, tmp_path)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_EVERY}"))
    # The resumed history starts with the checkpoint's (steps 1-3); steps 4-6 are trained again.
    # Same process, same CPU kernels, same data order and RNG: the curve is bit-identical.
    assert _losses(resumed) == _losses(trainer) and len(_losses(trainer)) == STEPS
    assert resumed.state.global_step == STEPS
    for name, tensor in fxpeft.adapter_state_dict(gm).items():
        assert torch.equal(fxpeft.adapter_state_dict(fresh)[name], tensor), name
    assert resumed.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()


def test_evaluation_inside_the_trainer(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    trainer = _trainer(gm, tmp_path, save_strategy="no", eval_strategy="steps", eval_steps=SAVE_EVERY)
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == STEPS // SAVE_EVERY
    gm.eval()
    with torch.no_grad():  # dropout off, as the Trainer's evaluation must have it
        ids = torch.stack([row["input_ids"] for row in DATA[:8]])
        manual = torch.stack([gm(input_ids=b, labels=b).loss for b in ids.split(8)]).mean()
    # One batch of 8 through the same graph: the same loss, bit for bit. It counts the shifted
    # labels (8 x 15 targets) only because the graph tells the Trainer its loss_type.
    assert gm.loss_type == "ForCausalLM"
    assert evals[-1] == manual.item()
    assert trainer.evaluate()["eval_loss"] == evals[-1]


def test_best_model_at_end_restores_that_checkpoint(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    trainer = _trainer(gm, tmp_path, eval_strategy="steps", eval_steps=SAVE_EVERY,
                       load_best_model_at_end=True, metric_for_best_model="eval_loss",
                       greater_is_better=True)  # the loss falls, so "best" is the first checkpoint
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / f"checkpoint-{SAVE_EVERY}")  # not the weights gm trained last
    saved = fxpeft.load(tiny_llama(), best)
    for name, tensor in fxpeft.adapter_state_dict(saved).items():
        assert torch.equal(fxpeft.adapter_state_dict(gm)[name], tensor), name


def test_every_adapter_is_checkpointed_in_peft_layout(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    gm.add_adapter("sql", "lora_qv.toml", r=4)
    trainer = _trainer(gm, tmp_path, max_steps=SAVE_EVERY)
    trainer.train()
    folder = tmp_path / f"checkpoint-{SAVE_EVERY}"
    assert set(os.listdir(folder)) == ADAPTER_FILES | TRAINER_FILES | {"sql"}
    assert set(os.listdir(folder / "sql")) == ADAPTER_FILES
    other = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    other.add_adapter("sql", "lora_qv.toml", r=4)
    randomize_adapters(other, seed=3)
    trainer._load_from_checkpoint(str(folder), other)
    for name, tensor in fxpeft.adapter_state_dict(gm).items():
        assert torch.equal(fxpeft.adapter_state_dict(other)[name], tensor), name


def test_restoring_another_adapter_is_refused_and_changes_nothing(tmp_path):
    folder = fxpeft.save(fxpeft.rewrite(tiny_llama(), "lora_qv.toml"), tmp_path / "qv")
    other = fxpeft.rewrite(tiny_llama(), "lora_qv.toml", alpha=32)
    before = {n: t.clone() for n, t in fxpeft.adapter_state_dict(other).items()}
    with pytest.raises(fxpeft.AdapterFileError, match=r"adapter_config.json: says lora_alpha = 16, "
                                                      r"but adapter 'default' of this graph has "
                                                      r"lora_alpha = 32"):
        restore(other, folder)
    assert all(torch.equal(before[n], t) for n, t in fxpeft.adapter_state_dict(other).items())
