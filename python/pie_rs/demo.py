"""A small real run: a tiny Llama generates with transformers' DynamicCache and with pie-rs.

``pie-rs demo`` checks the tokens are identical with about half the layers pooled in host
memory and prints throughput and the engine's statistics; ``pie-rs bench`` repeats the
comparison and reports the ratio. Both build the model from a config (no downloads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ._model import MANAGED, inspect_model
from .cache import _round_capacity
from .pool import attach

__all__ = ["DemoResult", "add_arguments", "build_model", "half_pooled_budget", "run_bench", "run_demo"]

_SLOT_ALIGN = 256


@dataclass
class DemoResult:
    """What one comparison measured."""

    identical: bool
    baseline_tokens_per_s: float
    pie_tokens_per_s: float
    stats: dict[str, Any]
    budget_bytes: int | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``demo`` and ``bench``."""
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the tiny Llama (default 8)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument(
        "--budget",
        default=None,
        help="gpu_budget for pie-rs (bytes, '6GiB', a fraction); default: pool about half the layers",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and prompts (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_model(
    layers: int = 8, hidden: int = 256, heads: int = 8, kv_heads: int = 4, vocab: int = 256, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised tiny Llama, built from a config (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def half_pooled_budget(model: torch.nn.Module, batch: int, max_length: int) -> int:
    """A device budget under which the engine pools about half the full-attention layers.

    Pooling ``c`` of ``M`` layers through one staging slot takes ``M - c + 1`` layer slots.
    """
    info = inspect_model(model)
    layer = next(li for li in info.layers if li.kind == MANAGED)
    elem = torch.empty((), dtype=info.dtype).element_size()
    raw = batch * layer.kv_heads * _round_capacity(max_length) * (layer.k_dim + layer.v_dim) * elem
    slot = -(-raw // _SLOT_ALIGN) * _SLOT_ALIGN
    managed = len(info.managed)
    pooled = max(1, managed // 2)
    return (managed - pooled + 1) * slot


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(ids.device)
    return out, time.perf_counter() - start


def _parse_budget_arg(text: str | None) -> int | float | str | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return value if "." in text or "e" in text.lower() else int(value)


def compare(args: argparse.Namespace, repeats: int = 1) -> DemoResult:
    """Runs the DynamicCache baseline and pie-rs ``repeats`` times each; returns medians."""
    device = _device(args.device)
    model = build_model(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, args.seed).to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    tokens = args.batch * args.new_tokens
    budget = _parse_budget_arg(args.budget)
    if budget is None:
        budget = half_pooled_budget(model, args.batch, args.prompt_len + args.new_tokens)

    _timed_generate(model, ids, 2)  # warm-up
    base_times, expected = [], None
    for _ in range(repeats):
        expected, seconds = _timed_generate(model, ids, args.new_tokens)
        base_times.append(seconds)
    with attach(model, gpu_budget=budget) as pool:
        _timed_generate(model, ids, 2)
        pie_times, got = [], None
        for _ in range(repeats):
            got, seconds = _timed_generate(model, ids, args.new_tokens)
            pie_times.append(seconds)
        stats = pool.stats()
    assert expected is not None and got is not None
    return DemoResult(
        identical=bool(torch.equal(expected, got)),
        baseline_tokens_per_s=tokens / statistics.median(base_times),
        pie_tokens_per_s=tokens / statistics.median(pie_times),
        stats=stats,
        budget_bytes=stats.get("budget_bytes"),
    )


def _report(result: DemoResult, args: argparse.Namespace, title: str) -> None:
    if args.json:
        print(json.dumps({**result.__dict__}, default=str, sort_keys=True))
        return
    s = result.stats
    print(f"{title}: tiny Llama, {args.layers} layers, batch {args.batch}, {args.prompt_len}+{args.new_tokens} tokens")
    print(f"  tokens identical to DynamicCache: {'yes' if result.identical else 'NO'}")
    print(f"  DynamicCache: {result.baseline_tokens_per_s:10.1f} tokens/s")
    ratio = result.pie_tokens_per_s / result.baseline_tokens_per_s
    print(f"  pie-rs:       {result.pie_tokens_per_s:10.1f} tokens/s ({ratio:.2f}x)")
    print(
        f"  layers: {s.get('resident_layers')} resident, {s.get('pooled_layers')} pooled; "
        f"budget {result.budget_bytes} B, peak device KV {s.get('peak_device_kv_bytes')} B, "
        f"host KV {s.get('host_kv_bytes')} B"
    )
    print(
        f"  moved: {s.get('h2d_bytes')} B host->device, {s.get('d2h_bytes')} B device->host; "
        f"stall {float(s.get('stall_seconds', 0.0)):.4f} s over {s.get('steps')} steps ({s.get('backend')} backend)"
    )


def run_demo(args: argparse.Namespace) -> int:
    """``pie-rs demo``: one comparison; exit status 1 if the tokens differ."""
    result = compare(args, repeats=1)
    _report(result, args, "pie-rs demo")
    return 0 if result.identical else 1


def run_bench(args: argparse.Namespace) -> int:
    """``pie-rs bench``: the comparison repeated ``--repeats`` times, medians reported."""
    result = compare(args, repeats=args.repeats)
    _report(result, args, f"pie-rs bench (median of {args.repeats})")
    return 0 if result.identical else 1
