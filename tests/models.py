"""Tiny models of several families, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", **_COMMON),
    "qwen2": dict(model_type="qwen2", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=None, **_COMMON),
    "mistral_sliding": dict(model_type="mistral", sliding_window=6, **_COMMON),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=4,
        n_head=4,
        n_positions=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    ),
    # Alternating sliding/full layers: 8 layers give 4 engine-managed ones, so a budget can force half pooled.
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=6, **(_COMMON | {"num_hidden_layers": 8})),
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=6,
        sliding_window_pattern=2,
        **(_COMMON | {"num_hidden_layers": 8}),
    ),
    "phi3": dict(model_type="phi3", **_COMMON),
}


def make_model(family: str, *, layers: int | None = None, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (eval mode, float32)."""
    kwargs = dict(FAMILIES[family])
    model_type = kwargs.pop("model_type")
    if layers is not None:
        kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    attn = "eager" if model_type.startswith("gemma") else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(device).eval()


def make_inputs(batch: int, length: int = 7, *, seed: int = 1, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random prompts; with batch > 1, left padding of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pad = min(row, length - 2)
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


#: Words of the tiny chat tokenizer (ids after the four special tokens).
CHAT_WORDS = tuple(
    [
        "user",
        "assistant",
        "system",
        ":",
        "hello",
        "world",
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "tell",
        "me",
        "story",
        "about",
        "blue",
        "red",
        "green",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "is",
        "was",
        "and",
        "or",
        "not",
        "yes",
        "no",
        "why",
        "how",
        "what",
        "who",
    ]
)

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def save_chat_model(path: str, *, family: str = "llama", layers: int | None = None, seed: int = 0) -> str:
    """Saves a tiny ``family`` model and a word-level tokenizer with a chat template to ``path``.

    Everything is built offline: the tokenizer knows ``CHAT_WORDS`` (others are ``<unk>``) and
    decodes with spaces between words.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    for word in CHAT_WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), VOCAB):  # the rest of the model's vocabulary decodes as w<id>
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    model = make_model(family, layers=layers, seed=seed)
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
