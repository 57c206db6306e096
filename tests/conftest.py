"""Tiny models built from configs, shared by the tests, plus graph-inspection helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch.fx.node import map_aggregate
from hypothesis import settings

# CI replays the same examples every run (a red CI run loses a submission); a failure prints the
# blob that reproduces it. Locally, hypothesis explores new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compiles in tests keep their kernels in a folder of this run's (removed at the end), not in
# the user's cache
_TEST_COMPILE_CACHE = None
if "FXPEFT_COMPILE_CACHE" not in os.environ:
    _TEST_COMPILE_CACHE = os.environ["FXPEFT_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="fxpeft-test-compile-cache-")
# captures kept on disk (fxpeft.capture.disk_cache) go to a folder of this run's too
_TEST_CAPTURE_CACHE = None
if "FXPEFT_CAPTURE_CACHE_DIR" not in os.environ:
    _TEST_CAPTURE_CACHE = os.environ["FXPEFT_CAPTURE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxpeft-test-capture-cache-")
warnings.filterwarnings("ignore")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_unconfigure(config):
    if _TEST_COMPILE_CACHE:
        os.environ["FXPEFT_COMPILE_CACHE"] = "0"  # nothing more kept at exit
        shutil.rmtree(_TEST_COMPILE_CACHE, ignore_errors=True)
    if _TEST_CAPTURE_CACHE:
        shutil.rmtree(_TEST_CAPTURE_CACHE, ignore_errors=True)

# The checkout holding tests/ (test files sit one folder deeper, by pipeline stage).
REPO_ROOT = Path(__file__).resolve().parents[1]

VOCAB = 128


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_mistral(**overrides):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB)
    return MistralForCausalLM(MistralConfig(**{**cfg, **overrides})).eval()


def tiny_qwen2(**overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB)
    return Qwen2ForCausalLM(Qwen2Config(**{**cfg, **overrides})).eval()


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
               bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).eval()


def tiny_opt(**overrides):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=1)
    return OPTForCausalLM(OPTConfig(**{**cfg, **overrides})).eval()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    vocab_size=VOCAB, num_labels=num_labels,
                                                    max_position_embeddings=256)).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                               vocab_size=VOCAB, decoder_start_token_id=0,
                                               pad_token_id=0)).eval()


WORD_SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "[UNK]": 3}


def word_tokenizer(padding_side: str = "left"):
    """A word-level tokenizer over the tiny models' vocabulary, built offline: ``w4`` ... are
    tokens 4 ..., with pad, eos, bos and unk specials; texts are words separated by spaces.

    >>> word_tokenizer()("w5 w6")["input_ids"]
    [5, 6]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {**WORD_SPECIALS, **{f"w{i}": i for i in range(len(WORD_SPECIALS), VOCAB - 1)},
             "abcdef": VOCAB - 1}  # the prefix transformers' StopStringCriteria tokenizes
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="[UNK]", padding_side=padding_side)


def word_texts(count: int, words: int = 8, seed: int = 0) -> list[str]:
    """``count`` texts of up to ``words`` random words of ``word_tokenizer``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, words // 2), words + 1, (count,), generator=generator)
    return [" ".join(f"w{int(i)}" for i in torch.randint(len(WORD_SPECIALS), VOCAB - 1, (int(n),), generator=generator))
            for n in lengths]


def token_batch(batch: int = 3, seq: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def nodes_with_target(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def nodes_with_target_anywhere(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    """``nodes_with_target`` in ``gm`` and in every graph module inside it (fuse's regions)."""
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in nodes_with_target(m, target)]


def loss_and_grads(gm, batch, seed=0):
    """The train loss of ``gm(**batch)`` (seeded) and the gradients it leaves; gradients cleared."""
    torch.manual_seed(seed)
    loss = gm(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    return loss.detach(), grads


def saved_bytes(gm, batch) -> int:
    """Bytes of activations (not weights) autograd keeps for backward after one forward; a
    tensor several ops keep counts once."""
    weights = {p.data_ptr() for p in gm.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            kept[tensor.data_ptr()] = max(kept.get(tensor.data_ptr(), 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gm(**batch).loss
    loss.backward()
    gm.zero_grad()
    return sum(kept.values())


@pytest.fixture
def llama():
    return tiny_llama()


def adapter_nodes(gm: torch.fx.GraphModule, kind: str = "lora") -> list[torch.fx.Node]:
    """Nodes a pass added for adapters of ``kind``."""
    from fxpeft.names import adapter_node
    return [n for n in gm.graph.nodes if getattr(adapter_node(n), "kind", None) == kind]


def lora_branch_count(gm: torch.fx.GraphModule) -> int:
    """One LoRA branch ends in one ``add`` that joins it to the base output."""
    return sum(1 for n in adapter_nodes(gm) if n.target == torch.ops.aten.add.Tensor)


def randomize_adapters(gm: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero adapter weights, so outputs and gradients depend on every adapter tensor."""
    import fxpeft
    generator = torch.Generator().manual_seed(seed)
    names = set(fxpeft.adapter_state_dict(gm))
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name in names:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def assert_only_adapters_get_grads(gm: torch.nn.Module) -> None:
    import fxpeft
    adapter_names = set(fxpeft.adapter_state_dict(gm))
    with_grad = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert with_grad == adapter_names, (with_grad ^ adapter_names)
    assert all(p.grad.abs().sum() > 0 for n, p in gm.named_parameters() if n in adapter_names)


def train(gm: torch.nn.Module, loss_of, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps on ``gm``'s trainable parameters; the loss after each."""
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(gm)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        vocab_size=VOCAB)).eval()


def tiny_gemma(**overrides):
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16, vocab_size=VOCAB)
    return GemmaForCausalLM(GemmaConfig(**{**cfg, **overrides})).eval()


def emitted_base(model):
    """The base model's emitted graph (signature, dropout as data), no adapters: what a merged or
    stripped graph must equal."""
    from fxpeft.capture.export import capture
    from fxpeft.runtime.emit import emit
    return emit(capture(model))


# A GPU test: marked `cuda`, and skipped, saying why, where no GPU exists.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA GPU on this machine")]


def on_cuda(test):
    """``CUDA_MARKS`` on a test function."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def _describe(value):
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape)), value.dtype
    return repr(value)


def graph_signature(graph: torch.fx.Graph) -> list[tuple]:
    """Each node's op, target, arguments (nodes by position), module stack, stack trace and
    value shape: everything but its name."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    def arg(a):
        return ("node", position[a]) if isinstance(a, torch.fx.Node) else a
    return [(n.op, str(n.target), map_aggregate(n.args, arg), map_aggregate(n.kwargs, arg),
             tuple((n.meta.get("nn_module_stack") or {}).items()), n.meta.get("stack_trace"),
             _describe(n.meta.get("val"))) for n in graph.nodes]


def device_constants(gm: torch.nn.Module) -> list[torch.device]:
    """The ``torch.device`` constants baked into the arguments of every graph inside ``gm``."""
    found = []
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                found += [v for v in (*node.args, *node.kwargs.values()) if isinstance(v, torch.device)]
    return found
