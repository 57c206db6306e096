#!/usr/bin/env bash
# The GPU checks, as one script for a short lease of a GPU machine (no network there): the
# `cuda` tests, then the benchmarks with --device cuda. Each section has its own time limit and
# writes its log to $OUT, so a slow one costs only itself.
#
#   bench/gpu.sh [tests,memory,run,profile,int8,fsdp,compile_time]   # default: all but compile_time
#
# Realistic shapes (bench/gpu_shapes.py; issue 29), planned as two runs of at most 10 minutes:
#   run 1: bench/gpu.sh shapes_lora,shapes_context   # Llama-3.2-1B shape, all sides; longest context
#   run 2: bench/gpu.sh shapes_more,memory           # QLoRA nf4, DoRA, the SmolLM2 shape; memory.py
#          (then, with time left: shapes_context_rest, tests)
# The shapes sections add to one JSON file, out/gpu_shapes.json (copied to $OUT after each):
# carry it to the second run (or run it on the still-warm machine) for the DoRA / LoRA ratio.
# Wheels in .whl/ for run 1: liger-kernel (and triton if the machine lacks it), peft.
# Wheels for what the machine lacks (bitsandbytes, and the transformers and peft versions the
# project is tested with) can travel in .whl/ and are installed first.
set -u
OUT=${OUT:-out/gpu}
SECTIONS=${1:-tests,memory,run,profile,int8,fsdp}
mkdir -p "$OUT"
# No network: a Hub look-up fails at once instead of waiting on connection timeouts (importing
# bitsandbytes asks the Hub for a CPU kernel where the `kernels` package is installed).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
# Installed, not only on the path: the bundled rule files are package data (fxpeft.bundled_rules).
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"

section() {  # name, seconds, command...
    local name=$1 seconds=$2; shift 2
    [[ ",$SECTIONS," == *",$name,"* ]] || return 0
    echo "=== $name (limit ${seconds}s)"
    local start=$SECONDS
    timeout -k 10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: rc $? in $((SECONDS - start))s"
    tail -n 40 "$OUT/$name.log"
}

section tests 100 python3 -m pytest -q -p no:cacheprovider -o addopts= -m cuda -rs tests
section memory 110 python3 bench/memory.py --device cuda --model smollm2-shape --steps 2 --timeout 45 \
    --variants "PEFT + HF checkpointing,fxpeft fused,fxpeft fused + checkpoint,fxpeft nf4 fused + checkpoint"
section run 180 python3 bench/run.py --device cuda --steps 10 --json "$OUT/run_cuda.json" \
    --rows eager,compiled,cudagraphs,adapters,mixed,inference
section profile 60 python3 bench/profile_step.py --device cuda --steps 10
section int8 50 python3 - <<'PY'
# fxpeft's 8-bit op (dequantize, then matmul) against bitsandbytes' own CUDA route, same LoRA.
import sys, tempfile, torch
sys.path.insert(0, "tests")
from conftest import randomize_adapters, tiny_llama, token_batch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaForCausalLM
import fxpeft
folder = tempfile.mkdtemp(); tiny_llama().save_pretrained(folder)
load = lambda: LlamaForCausalLM.from_pretrained(folder, device_map="cuda",
    quantization_config=BitsAndBytesConfig(load_in_8bit=True)).train()
peft_model = get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]))
randomize_adapters(peft_model, seed=3); peft_model.save_pretrained(folder + "/a")
ids = token_batch().cuda()
gm = fxpeft.load(load(), folder + "/a").train()
ours, theirs = gm(ids).logits, peft_model(input_ids=ids).logits
print("int8 on CUDA: max |fxpeft - PEFT| =", (ours - theirs).abs().max().item(),
      "; logits max-abs", theirs.abs().max().item())
PY
# FSDP2 layer by layer, world size 1 on nccl: bf16 base, fp32 adapters, MixedPrecisionPolicy;
# prints every parameter's device and dtype and one step's loss against the unsharded graph's,
# also through accelerate's FSDP2 plugin (torchrun: accelerate sees MULTI_GPU, so FSDP is on).
section fsdp 90 python3 -m torch.distributed.run --standalone --nproc_per_node=1 bench/fsdp_check.py \
    --device cuda --backend nccl
SHAPES=(python3 bench/gpu_shapes.py --json out/gpu_shapes.json)
mkdir -p out
# Each side is a process of its own with its own limit (the section's limit is the backstop).
section shapes_lora 290 "${SHAPES[@]}" --sections lora --steps 10 --warmup 3 --side-timeout 110
# the context search: the target side and the two it is compared with first (recompiles cost)
section shapes_context 240 "${SHAPES[@]}" --sections context --budget-gib 40 --context-seconds 50 \
    --side-timeout 110 --sides "PEFT eager,fxpeft fused + compiled,PEFT + Liger"
section shapes_more 420 "${SHAPES[@]}" --sections qlora,dora,smollm2 --steps 8 --warmup 3 --side-timeout 80
section shapes_context_rest 200 "${SHAPES[@]}" --sections context --budget-gib 40 --context-seconds 50 \
    --side-timeout 95 --sides "PEFT + compile,fxpeft"
cp out/gpu_shapes.json "$OUT/" 2>/dev/null
section compile_time 300 python3 bench/run.py --device cuda --rows compile_time --compile-repeats 1
exit 0
