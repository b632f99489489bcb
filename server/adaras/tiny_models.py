"""Tiny random-weight models for tests, benchmarks and smoke runs, built offline
(in the package so that nothing outside tests/ imports tests/).

`make_tiny_model(path, "qwen3")` writes a Hugging Face model directory
(config, safetensors weights, a BPE tokenizer trained here with `tokenizers`,
a chat template) that both vLLM and transformers load. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHS = ("qwen3", "qwen2", "llama")

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    words = (
        "the a of to and in is it that for on with as was at by an be this from or have one "
        "two three four five six seven eight nine ten plus minus times equals answer question "
        "step first then so therefore total each more less apples coins students books hours"
    ).split()
    lines = []
    for i in range(2000):
        n = [words[(i * 7 + j * 13) % len(words)] for j in range(12)]
        lines.append(f"{' '.join(n)} {i} + {i % 17} = {i + i % 17}.")
    return lines


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=_CHAT_TEMPLATE,
    )


def make_tiny_model(
    path: str | Path,
    arch: str = "qwen3",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 192,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-weight `arch` model to `path` and return it (idempotent)."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    path = Path(path)
    done = path / ".adaras-tiny.json"
    spec = dict(arch=arch, num_layers=num_layers, hidden_size=hidden_size,
                intermediate_size=intermediate_size, num_heads=num_heads,
                num_kv_heads=num_kv_heads, vocab_size=vocab_size, seed=seed)
    if done.exists() and json.loads(done.read_text()) == spec:
        return path

    tokenizer = _train_tokenizer(vocab_size)
    head_dim = hidden_size // num_heads
    if head_dim < 32:
        raise ValueError(f"head_dim={head_dim}: vLLM's CPU attention needs head_dim >= 32")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=head_dim, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(head_dim=head_dim, **common)
        cls = transformers.LlamaForCausalLM

    torch.manual_seed(seed)
    model = cls(config)
    # Random init gives near-uniform logits; sharpen them so greedy decoding is
    # decisive and parity tests compare real token choices, not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model = model.to(torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    done.write_text(json.dumps(spec))
    return path
