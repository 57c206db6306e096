"""Training: a plain AdamW loop and the HF Trainer both lower the loss; only adapters move."""

import torch
from transformers import Trainer, TrainingArguments

import fxpeft
from conftest import tiny_llama, token_batch, train


def test_adamw_loop_lowers_loss():
    model = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    gm = fxpeft.rewrite(model, "lora_qv.toml").train()
    ids = token_batch(4, 16)
    losses = train(gm, lambda g: g(input_ids=ids, labels=ids).loss)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())


def test_hf_trainer_trains_the_graph_unchanged(tmp_path):
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    rows = token_batch(16, 16)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=5, report_to=[], save_strategy="no",
                             use_cpu=True, seed=42)
    trainer = Trainer(model=gm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_num_items_in_batch_is_honoured():
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml")
    ids = token_batch(2, 9)
    mean_loss = gm(input_ids=ids, labels=ids).loss
    summed = gm(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4)).loss
    tokens = ids[:, 1:].numel()  # shifted labels
    torch.testing.assert_close(summed, mean_loss * tokens / 4)
