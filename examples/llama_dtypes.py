"""The paper's LLaMA identity check, on a random Llama-shaped model in four dtypes (offline).

    python examples/llama_dtypes.py [--layers 4] [--d-model 512] [--n 8] [--T 32]

Petrov et al. check the prefix identity on LLaMA-7B in fp16 (max abs error 4.88e-4). Here the
same check, `probe.hf.check_hf`, runs on one random Llama-shaped model (grouped-query attention,
rotary positions) with one random key/value prefix (P=4, drawn in float64 and cast), in float16,
bfloat16, float32 and float64. Printed per dtype: the largest error of the pattern identity
(prefix and content columns) and of the output identity z = (1 - alpha) z_base + alpha * bias
over every layer, head and query, and the same divided by the dtype's machine epsilon.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from probe import hf
    from probe.model import KVPrefix

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n", type=int, default=8, help="inputs")
    p.add_argument("--T", type=int, default=32, help="tokens per input")
    p.add_argument("--P", type=int, default=4, help="prefix length")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=1000, max_position_embeddings=256)  # fmt: skip
    model64 = LlamaForCausalLM(cfg).eval().double()
    tokens = torch.randint(0, cfg.vocab_size, (args.n, args.T))
    g = torch.Generator().manual_seed(1)
    d_head = args.d_model // 8
    # keys at 4x the content keys' scale would swamp the content; 1x keeps alpha mid-range
    ref = hf.hf_records(model64, tokens[:2], verify=False)
    scale = [r.k.std().item() for r in ref]
    prefix = [
        KVPrefix(s * torch.randn(args.P, 4, d_head, generator=g, dtype=torch.float64),
                 torch.randn(args.P, 4, d_head, generator=g, dtype=torch.float64))
        for s in scale
    ]  # fmt: skip
    print(f"random Llama: {args.layers} layers, d_model {args.d_model}, 8 heads / 4 kv heads, "
          f"{args.n} inputs x {args.T} tokens, P={args.P}")  # fmt: skip
    print(f"{'dtype':9s} {'eps':>9s} {'pattern err':>12s} {'z err':>10s} {'pattern/eps':>12s} "
          f"{'z/eps':>8s} {'alpha mean':>10s}")  # fmt: skip
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        model = LlamaForCausalLM(cfg).eval()
        model.load_state_dict(model64.state_dict())
        model = model.to(dtype)
        kv = [KVPrefix(p.keys.to(dtype), p.values.to(dtype)) for p in prefix]
        res = hf.check_hf(model, tokens, prefix=kv, downstream=False,
                          verify=dtype in (torch.float32, torch.float64))  # fmt: skip
        pat = max(d.pattern_error.max().item() for d in res.decompositions)
        z = max(d.z_error.max().item() for d in res.decompositions)
        alpha = sum(d.alpha.mean().item() for d in res.decompositions) / args.layers
        eps = torch.finfo(dtype).eps
        print(f"{str(dtype)[6:]:9s} {eps:9.2e} {pat:12.2e} {z:10.2e} {pat / eps:12.1f} "
              f"{z / eps:8.1f} {alpha:10.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
