"""Worked example: the attention-bias theorem on GPT-2 small with PEFT adapters.

Needs the hf extra and hub access (downloads gpt2, ~500 MB, once):

    pip install 'prefix-probe[hf]'
    python examples/gpt2_prefix.py                      # float32, ~1 minute on a laptop CPU
    python examples/gpt2_prefix.py --dtype float64      # errors at ~1e-15 instead of ~1e-6

It trains three adapters on one sentence for a few steps (prefix-tuning, prompt-tuning, LoRA on
the attention's c_attn), then probes each with ``probe.hf.check_hf``:

- prefix- and prompt-tuning: at every layer and head the recorded pattern equals
  [alpha beta | (1 - alpha) A] and the head output (1 - alpha) z_base + alpha sum_p beta_p V_p,
  with A and z_base the *frozen* head recomputed on the same layer input: local drift 0, the
  prefix's contribution of rank <= P; later layers' attention shifts only through their inputs
  (downstream drift);
- LoRA on W_Q/W_K: local drift > 0, the toolkit detects that relative attention changed.

Not run in CI (it needs the network); the same code runs offline in tests/test_hf.py on a tiny
random GPT-2.
"""

from __future__ import annotations

import argparse
import copy

import torch

from probe.hf import check_hf, require_hf

TEXT = "The quick brown fox jumps over the lazy dog because it wants to reach the river."


def train_adapter(model, peft_config, tokens, steps: int, lr: float):
    """A few steps of next-token training of a PEFT adapter on ``tokens`` [1, T]."""
    peft = require_hf().peft
    tuned = peft.get_peft_model(copy.deepcopy(model), peft_config)
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    tuned.train()
    for _ in range(steps):
        loss = tuned(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"  trained {type(peft_config).__name__}: {steps} steps, final loss {loss.item():.3f}")
    return tuned.eval()


def summarise(name: str, result) -> None:
    """One line per layer: identity errors vs tolerance, local/downstream drift, bias rank."""
    print(
        f"\n{name}: identities expected at layers {[i for i, e in enumerate(result.expected) if e]}"
    )
    print("layer  P  alpha_mean  pattern_err  z_err     tol      local_tv  downstream_tv  rank")
    for i, d in enumerate(result.decompositions):
        local = result.local[i].tv_max.max().item()
        down = result.downstream[i].tv_mean.mean().item()
        rank = int(result.subspaces[i].rank.max())
        print(
            f"{d.layer:5d} {d.P:2d}  {d.alpha.mean().item():10.3f}  "
            f"{d.pattern_error.max().item():11.2e}  {d.z_error.max().item():.2e}  "
            f"{result.z_tol[i]:.1e}  {local:8.2e}  {down:13.2e}  {rank:4d}"
        )
    if not any(result.expected):
        print("  no identity applies: the heads' W_Q/W_K/W_V changed; drift only")
    elif result.ok:
        print("  all identities hold to rounding")
    else:
        print("  FAILED:\n  " + "\n  ".join(result.failures()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", help="hub id or local directory (GPT-2 family)")
    p.add_argument("--text", default=TEXT)
    p.add_argument("--prefix-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="training steps per adapter")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args(argv)

    hf = require_hf()  # says what to install if the hf extra is missing
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tokenizer = hf.transformers.AutoTokenizer.from_pretrained(args.model)
    model = hf.transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tokens = tokenizer(args.text, return_tensors="pt").input_ids  # [1, T], no padding
    print(f"{args.model} ({args.dtype}), {tokens.shape[1]} tokens: {args.text!r}")

    P = args.prefix_len
    prefix = train_adapter(
        model,
        hf.peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        tokens,
        args.steps,
        lr=1e-2,
    )
    prompt = train_adapter(
        model,
        hf.peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=P,
            prompt_tuning_init="TEXT",  # start from the embeddings of a real phrase
            prompt_tuning_init_text="Summarise the sentence:",
            tokenizer_name_or_path=args.model,
        ),
        tokens,
        args.steps,
        lr=1e-2,
    )
    lora = train_adapter(
        model,
        hf.peft.LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True),
        tokens,
        args.steps,
        lr=1e-3,
    )

    # Content positions are P..P+T-1 under PEFT; check_hf runs the base model at the same
    # position ids for the downstream comparison.
    summarise(f"prefix-tuning, P={P}", check_hf(model, tokens, prefix=prefix))
    summarise(
        f"prompt-tuning, P={P} (converted to a per-layer prefix)",
        check_hf(model, tokens, prefix=prompt),
    )
    lora_result = check_hf(model, tokens, tuned_model=lora)
    summarise("LoRA on c_attn (W_Q, W_K, W_V)", lora_result)
    moved = max(d.tv_max.max().item() for d in lora_result.local)
    print(f"  LoRA moved up to {moved:.1%} of some query's attention (a prefix moves none)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
