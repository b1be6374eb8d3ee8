"""Host attention end to end: ``generate`` with every layer pooled, copied vs attended on the host.

A small Llama-shaped model (4 layers, 8 query heads over 2 KV heads, head_dim 64, fp32) decodes
32 tokens after a prompt of ``--prompt`` tokens at batch 4, all four layers pinned in host memory,
once with ``host_attention="never"`` (each pooled layer copied to a staging slot every step) and
once with ``"always"`` (each attended where it lives), alternating ``--repeats`` times. Prints the
wall time, the host kernel's seconds, the bytes copied host-to-device and whether the tokens equal
transformers' own ``DynamicCache`` run. On the host backend the "device" is the CPU too, so the
wall times compare the two paths' overheads, not a PCIe link against CPU memory.

    python benches/host_attention_generate.py [--prompt 2000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import pie_rs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=128,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=args.prompt + 64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 128, (4, args.prompt))
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    reference = model.generate(input_ids=ids, **gen)
    for _ in range(args.repeats):
        for choice in ("never", "always"):
            with pie_rs.attach(model, pooled_layers=[0, 1, 2, 3], prefetch_depth=1, host_attention=choice) as pool:
                start = time.perf_counter()
                out = model.generate(input_ids=ids, **gen)
                seconds = time.perf_counter() - start
                stats = pool.stats()
            print(
                f"host_attention={choice:6s} tokens equal: {torch.equal(out, reference)}  {seconds:.2f} s  "
                f"host kernel {stats['host_attention_seconds']:.3f} s over {stats['host_attended_layer_steps']} "
                f"layer-steps  h2d {stats['h2d_bytes'] / 2**20:.0f} MiB"
            )


if __name__ == "__main__":
    main()
