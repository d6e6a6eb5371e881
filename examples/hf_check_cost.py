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


REPO = Path(__file__).resolve().parents[1]


def peak_rss(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of ``cmd`` under GNU time, run with this checkout's
    code first on the path (not whatever copy of prefix-probe the interpreter has installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
           os.environ.get("PYTHONPATH")]))}  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode not in (0, 1):
        raise SystemExit(out.stderr[-2000:])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return wall, kb * 1024, out.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", nargs="+", default=["gpt2", "llama"])
    p.add_argument("--dir", default="/tmp/hf-cost")
    p.add_argument("--n", type=int, help="inputs (default: the CLI's)")
    args = p.parse_args()
    extra = [] if args.n is None else ["--n", str(args.n)]
    py = sys.executable
    imports = "import torch, transformers, probe.hf as h, prefix_probe.cli; h.require_hf(False)"
    _, base_rss, _ = peak_rss([py, "-c", imports])
    for arch in args.arch:
        path = Path(args.dir) / arch
        size = build(arch, path)
        load = os.getloadavg()
        cmd = [py, "-m", "prefix_probe", "check-theorem", "--base", str(path), *extra]  # probe
        wall, rss, out = peak_rss(cmd)
        after = os.getloadavg()
        ok = "FAIL" not in out and out.count(" ok ") > 0
        inputs = out.splitlines()[0].split(": ", 1)[-1].split(",")[0] if out else "?"
        print(
            f"{arch}: model {size / 2**20:.0f} MiB; check-theorem ({inputs}) {wall:.1f} s, peak "
            f"{(rss - base_rss) / 2**20:.0f} MiB beyond the interpreter "
            f"({(rss - base_rss) / size:.2f}x the model); identities {'ok' if ok else 'FAILED'}; "
            f"load average (1 min) {load[0]:.2f} before, {after[0]:.2f} after, on "
            f"{os.cpu_count()} cores",
            flush=True,
        )


if __name__ == "__main__":
    main()
