"""Run by tests/integration/test_ddp.py under ``torchrun --nproc_per_node=2``: fxpeft.Trainer with DDP trains
4 steps (checkpoints at 2 and 4), then resumes from step 2; each rank writes its adapter
digests to ``<output>/rank<r>.json``."""

import json
import os
import sys
from pathlib import Path

from transformers import TrainingArguments

import fxpeft
from conftest import tiny_llama, token_batch
from fxpeft.io.serialize import tensor_digest


def digest(gm) -> str:
    return tensor_digest(fxpeft.adapter_state_dict(gm))


def main(output: Path) -> None:
    gm = fxpeft.rewrite(tiny_llama(), "lora_qv.toml", dropout=0.0)
    data = [{"input_ids": row, "labels": row} for row in token_batch(16, 16)]
    args = TrainingArguments(output_dir=str(output), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=2,
                             use_cpu=True, seed=42, disable_tqdm=True)
    trainer = fxpeft.Trainer(model=gm, args=args, train_dataset=data)
    trainer.train()
    facts = {"wrapped": type(trainer.model_wrapped).__name__, "trained": digest(gm)}
    trainer.train(resume_from_checkpoint=str(output / "checkpoint-2"))
    facts["resumed"] = digest(gm)
    (output / f"rank{os.environ['RANK']}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    finally:  # the Trainer leaves its process group up; gloo's threads torn down at exit aborted
        # a rank once ("terminate called without an active exception", SIGABRT)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
