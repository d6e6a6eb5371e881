"""Time and peak memory of `probe check-theorem` on random HF models of real sizes (offline).

    python examples/hf_check_cost.py [--arch gpt2 llama] [--dir /tmp/hf-cost]

Builds a random GPT-2-small-shaped model (124M parameters, float32) and a Llama-shaped one
(~100M: 12 layers, d_model 768, 12 heads / 4 key-value heads, 32k vocabulary), saves each once,
then runs `probe check-theorem --base DIR` with the CLI defaults (256 sort_asc inputs, a random
P=4 key/value prefix) in a fresh process under /usr/bin/time, and the bare interpreter with the
same imports, so "beyond the interpreter" = peak RSS of the check - peak RSS of the imports.
Prints one line per model with the machine load (`uptime`) before each run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(arch: str, path: Path) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())  # gpt2 (small): 12 x 768, 50257 vocab
    else:
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                        max_position_embeddings=2048, tie_word_embeddings=True)
        )  # fmt: skip
    if not (path / "config.json").exists():
        model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of ``cmd`` under GNU time."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 1):
        raise SystemExit(out.stderr[-2000:])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return wall, kb * 1024, out.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    p.add_argument("--dir", default="/tmp/hf-cost")
    args = p.parse_args()
    py = sys.executable
    imports = "import torch, transformers, peft, probe.hf as h, probe.cli; h.require_hf()"
    _, base_rss, _ = peak_rss([py, "-c", imports])
    for arch in args.arch:
        path = Path(args.dir) / arch
        size = build(arch, path)
        load = os.getloadavg()
        wall, rss, out = peak_rss([py, "-m", "probe.cli", "check-theorem", "--base", str(path)])
        ok = "FAIL" not in out and out.count(" ok ") > 0
        print(
            f"{arch}: model {size / 2**20:.0f} MiB; check-theorem (defaults) {wall:.1f} s, peak "
            f"{(rss - base_rss) / 2**20:.0f} MiB beyond the interpreter "
            f"({(rss - base_rss) / size:.2f}x the model); identities {'ok' if ok else 'FAILED'}; "
            f"load average before {load[0]:.2f} on {os.cpu_count()} cores"
        )


if __name__ == "__main__":
    main()
