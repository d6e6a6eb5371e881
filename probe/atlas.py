"""The PEFT atlas: every PEFT method that acts on attention or its inputs, on every architecture
:mod:`probe.hf` supports, classified by what it measurably does to attention.

For each (method, architecture) a tiny random model (float64) and a randomly initialised adapter
(the zero-initialised parts perturbed, so the method does something: LoRA's B, the adaption
gate, IA3's scales) are checked with :func:`probe.hf.check_hf`, verified against PEFT's own
forward and ``generate``, and classified (:mod:`probe.classify`). :func:`write_atlas` renders
the table; ``examples/peft_atlas.py`` writes it to a file.

Out of scope, by kind: the other weight adapters of PEFT (LoHa, LoKr, OFT, BOFT, VeRA,
FourierFT, ...) change W_Q / W_K / W_V as LoRA does and are measured the same way
(``tuned_model=``); LoHa and LoKr stand for them here. Methods that touch neither attention nor
its inputs (e.g. LN tuning of the final norm only, trainable tokens outside the prompt) cannot
move a pattern except through the residual stream, which local drift already separates.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from probe import hf
from probe.classify import CLASSES, DERIVATIONS
from tasks.errors import message_line

ARCHS = ("gpt2", "llama", "qwen2", "mistral", "neox")
_LAYERS, _VOCAB, _P = 2, 50, 3

# Each architecture's modules holding W_Q and W_K (LoRA / DoRA / LoHa / LoKr targets) and W_V.
_QK = {"gpt2": ["c_attn"], "neox": ["query_key_value"]}
_V = {"gpt2": ["c_attn"], "neox": ["query_key_value"]}


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny random causal LM of one architecture: 2 layers, d_model 32, vocab 50, in eval
    mode. Llama: grouped-query attention (4 heads, 2 kv heads); Qwen2: with q/k biases made
    non-zero; Mistral: one kv head; GPT-NeoX: partial rotary (a quarter), parallel residual."""
    tf = hf.require_hf(peft=False).transformers
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {list(ARCHS)}")
    torch.manual_seed(seed)
    common = dict(vocab_size=_VOCAB, bos_token_id=0, eos_token_id=0)
    sizes = dict(hidden_size=32, intermediate_size=48, max_position_embeddings=64, **common)
    llama = dict(num_hidden_layers=_LAYERS, num_attention_heads=4, num_key_value_heads=2, **sizes)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=_LAYERS, n_head=2, n_embd=32, n_positions=64, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama))
        with torch.no_grad():  # HF initialises the biases to 0: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.bias.normal_(0, 0.5)
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**{**llama, "num_key_value_heads": 1}))
    else:
        cfg = tf.GPTNeoXConfig(num_hidden_layers=_LAYERS, num_attention_heads=4, rotary_pct=0.25,
                               use_parallel_residual=True, **sizes)  # fmt: skip
        model = tf.GPTNeoXForCausalLM(cfg)
    return model.eval().to(dtype)


def _perturb(model: nn.Module, names: tuple[str, ...], scale: float, seed: int) -> None:
    """Fill every parameter whose name contains one of ``names`` with scale * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def unit_key_scales(model: nn.Module, arch: str) -> None:
    """Set an IA3 model's query and key scales to 1 (values and FFN scales kept): the layout of
    each architecture's projection output says which entries scale q and k."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not hasattr(mod, "ia3_l") or getattr(mod, "is_feedforward", True):
                continue
            scale = mod.ia3_l["default"].view(-1)
            if name.endswith(("q_proj", "k_proj")):
                scale.fill_(1.0)
            elif name.endswith("c_attn"):  # [q (d) | k (d) | v (d)]
                scale[: 2 * scale.numel() // 3] = 1.0
            elif name.endswith("query_key_value"):  # per head [q (e) | k (e) | v (e)]
                scale.view(-1, 3, scale.numel() // model.config.num_attention_heads // 3)[:, :2] = (
                    1.0
                )


def _ia3(arch: str, base: nn.Module, keys: bool, seed: int) -> nn.Module:
    peft = hf.require_hf().peft
    m = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    if not keys:
        unit_key_scales(m, arch)
    return m


def _build(method: str, arch: str, base: nn.Module, seed: int) -> dict:
    """The adapter of ``method`` on a copy of ``base``: keyword arguments for check_hf."""
    peft = hf.require_hf().peft
    fifo = arch == "gpt2"  # GPT-2's Conv1D stores W as [in, out]
    cfgs: dict[str, Callable[[], object]] = {
        "prefix-tuning": lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=_P
        ),
        "P-tuning": lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=_P, encoder_hidden_size=16
        ),
        "prompt-tuning": lambda: peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=_P
        ),
        "LoRA (Q,K)": lambda: peft.LoraConfig(
            target_modules=_QK.get(arch, ["q_proj", "k_proj"]), r=2, fan_in_fan_out=fifo
        ),
        "LoRA (V)": lambda: peft.LoraConfig(
            target_modules=_V.get(arch, ["v_proj"]), r=2, fan_in_fan_out=fifo
        ),
        "DoRA (Q,K)": lambda: peft.LoraConfig(
            target_modules=_QK.get(arch, ["q_proj", "k_proj"]),
            r=2,
            use_dora=True,
            fan_in_fan_out=fifo,
        ),  # fmt: skip
        "LoHa (Q,K)": lambda: peft.LoHaConfig(
            target_modules=_QK.get(arch, ["q_proj", "k_proj"]), r=2, init_weights=False
        ),
        "LoKr (Q,K)": lambda: peft.LoKrConfig(
            target_modules=_QK.get(arch, ["q_proj", "k_proj"]), r=2, init_weights=False
        ),
        "adaption prompt": lambda: peft.AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=_P, adapter_layers=_LAYERS
        ),
    }
    torch.manual_seed(seed)
    if method.startswith("IA3"):
        return {"tuned_model": _ia3(arch, base, method == "IA3 (K,V,FFN)", seed).eval()}
    if method == "full fine-tuning":
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return {"tuned_model": tuned}
    m = peft.get_peft_model(copy.deepcopy(base), cfgs[method]()).eval()
    if method in ("prefix-tuning", "prompt-tuning"):
        _perturb(m, ("prompt_encoder",), 0.7 if method == "prefix-tuning" else 1.0, seed)
    elif method.startswith(("LoRA", "DoRA")):
        _perturb(m, ("lora_B",), 0.3, seed)
    elif method == "adaption prompt":
        _perturb(m, ("adaption_gate",), 1.0, seed)
    learned = m.peft_config["default"].is_prompt_learning
    return {"prefix": m} if learned else {"tuned_model": m}


METHODS = (
    "prefix-tuning",
    "P-tuning",
    "prompt-tuning",
    "adaption prompt",
    "LoRA (Q,K)",
    "LoRA (V)",
    "DoRA (Q,K)",
    "LoHa (Q,K)",
    "LoKr (Q,K)",
    "IA3 (K,V,FFN)",
    "IA3 (V,FFN)",
    "full fine-tuning",
)


@dataclass(frozen=True)
class AtlasCell:
    """One (method, architecture): the class, the largest local drift, the largest bias rank,
    whether the run reproduced PEFT's forward and generate and the class's identity held; or
    why there is no result (``note``: e.g. PEFT does not support the method there)."""

    method: str
    arch: str
    name: str = ""
    max_drift: float = float("nan")
    bias_rank: int = -1
    verified: bool = False
    note: str = ""


def atlas_cell(method: str, arch: str, seed: int = 0, batch: int = 4, T: int = 8) -> AtlasCell:
    """Build, check and classify one (method, architecture) on ``batch`` random inputs of T."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    base = tiny_model(arch, seed)
    tokens = torch.randint(1, _VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))
    try:
        kwargs = _build(method, arch, base, seed + 1)
    except (ValueError, TypeError) as e:  # PEFT refuses the method on this architecture
        return AtlasCell(method, arch, note=f"PEFT: {message_line(e)}")
    result = hf.check_hf(base, tokens, **kwargs)  # verify=True: PEFT's forward and generate
    c = result.classify()
    return AtlasCell(method, arch, c.name, c.max_drift, c.bias_rank, c.identity_ok)


def build_atlas(
    methods: tuple[str, ...] = METHODS, archs: tuple[str, ...] = ARCHS, seed: int = 0
) -> list[AtlasCell]:
    """Every (method, architecture) cell, methods outer."""
    return [atlas_cell(m, a, seed) for m in methods for a in archs]


# Our own adapters (probe.adapters) on a random model of ours: label -> (method, options).
OWN_METHODS = {
    "prefix": ("prefix", {"length": _P}),
    "vt-prefix": ("vt-prefix", {"length": _P}),
    "prompt": ("prompt", {"length": _P}),
    "adaption_prompt": ("adaption_prompt", {"length": _P}),
    "lora (Q,K)": ("lora", {"rank": 2, "targets": ("W_Q", "W_K")}),
    "lora (V)": ("lora", {"rank": 2, "targets": ("W_V",)}),
    "prefix+lora": ("prefix+lora", {"length": _P, "rank": 2, "targets": ("W_Q", "W_V")}),
    "ia3 (K,V,MLP)": ("ia3", {}),
    "ia3 (V,MLP)": ("ia3", {"targets": ("W_V", "W_out")}),
    "full": ("full", {}),
}


def own_cell(label: str, seed: int = 0, batch: int = 4, T: int = 8) -> AtlasCell:
    """One of our adapters (:data:`OWN_METHODS`) on a random float64 ``tiny`` model of ours,
    every trained tensor moved by 0.1 N(0, 1) (LoRA's B, the gates, IA3's scales off their
    start), checked with :func:`probe.check.check_tuned` and classified; ``verified`` is the
    class's own identity holding (there is no PEFT forward to compare with)."""
    from probe.adapters import make_adapter
    from probe.check import check_tuned
    from probe.model import Transformer, preset

    if label not in OWN_METHODS:
        raise ValueError(f"unknown method {label!r}; choose from {list(OWN_METHODS)}")
    method, options = OWN_METHODS[label]
    torch.manual_seed(seed)
    base = Transformer(preset("tiny", dropout=0.0)).double()
    adapter = make_adapter(method, base, **options)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, base.cfg.d_vocab, (batch, T), generator=g)
    c = check_tuned(base, adapter, tokens).classify()
    return AtlasCell(label, "ours (tiny)", c.name, c.max_drift, c.bias_rank, c.identity_ok)


def render_atlas(cells: list[AtlasCell], seconds: float | None = None) -> str:
    """The atlas as markdown: a class grid (method x architecture), the measured table, and the
    derivation behind each class."""
    archs = list(dict.fromkeys(c.arch for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    by = {(c.method, c.arch): c for c in cells}
    out = ["# PEFT atlas: which methods can re-weight attention", ""]
    out += [
        "Tiny random float64 models, randomly initialised adapters; every run verified against "
        "PEFT's own forward and `generate` (`probe.atlas`, `examples/peft_atlas.py`).",
        "",
        "| method | " + " | ".join(archs) + " |",
        "|---|" + "---|" * len(archs),
    ]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(by[m, a].name or "n/a" for a in archs) + " |")
    out += ["", "| method | architecture | class | max local drift | bias rank | verified |"]
    out.append("|---|---|---|---|---|---|")
    for c in cells:
        if c.note:
            out.append(f"| {c.method} | {c.arch} | n/a | | | {c.note} |")
        else:
            ok = "yes" if c.verified else "NO"
            out.append(
                f"| {c.method} | {c.arch} | {c.name} | {c.max_drift:.2e} | {c.bias_rank} | {ok} |"
            )
    out += [
        "",
        f"Bias rank: the largest per-head rank of what the tuning adds to the head's output "
        f"(prefix methods: <= P = {_P}; adaption prompt: <= adapter_len = {_P}; the other "
        "classes: the rank of the whole change). GPT-2 and GPT-NeoX fuse W_Q, W_K, W_V into "
        "one module, so a LoRA aimed at W_V there adapts all three (and re-weights). n/a: PEFT "
        "does not support the method on that architecture.",
        "",
        "## Classes and their derivations",
        "",
    ]
    out += [f"- **{k}**: {DERIVATIONS[k]}" for k in CLASSES]
    if seconds is not None:
        out += ["", f"Built in {seconds:.1f} s."]
    return "\n".join(out) + "\n"


def write_atlas(path: str | Path, seed: int = 0) -> list[AtlasCell]:
    """Build the whole atlas and write its markdown to ``path``; -> the cells.

    The file holds no timing, so that the same seed writes the same bytes; it is written whole
    or not at all (a temporary file renamed into place)."""
    cells = build_atlas(seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_atlas(cells))
    os.replace(tmp, path)
    return cells


__all__ = [
    "ARCHS",
    "AtlasCell",
    "METHODS",
    "OWN_METHODS",
    "atlas_cell",
    "build_atlas",
    "own_cell",
    "render_atlas",
    "tiny_model",
    "unit_key_scales",
    "write_atlas",
]
