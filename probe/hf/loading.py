"""The optional HF stack, and loading saved HF models, PEFT adapters and tokenizers.

Nothing here imports peft or transformers at import time: :func:`require_hf` does, on first use,
and raises :class:`MissingExtraError` naming what to install.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from probe.hf.arch import _architecture, _dtype, _is_peft, _peft_cfg, _shape
from tasks.errors import message_line

INSTALL_HINT = "pip install 'prefix-probe[hf]'"


# Prompt-learning PEFT methods we can turn into a per-layer key/value prefix.
PREFIX_PEFT_TYPES = ("PREFIX_TUNING",)


PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")


class MissingExtraError(ImportError):
    """The optional ``hf`` extra (peft, transformers) is not installed."""


def require_hf(peft: bool = True) -> SimpleNamespace:
    """Import the optional HF stack lazily; raise :class:`MissingExtraError` naming the fix.

    Returns a namespace with ``transformers`` and (``peft=True``) ``peft``. Paths without an
    adapter pass ``peft=False``: importing peft would lengthen a check's start-up for a package
    they do not use.
    """
    try:
        import transformers

        peft_module = importlib.import_module("peft") if peft else None
    except ImportError as e:
        raise MissingExtraError(
            f"probing Hugging Face models needs the optional packages peft and transformers "
            f"(import failed: {e}); install them with: {INSTALL_HINT}"
        ) from e
    return SimpleNamespace(transformers=transformers, peft=peft_module)


def is_peft_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a saved PEFT adapter: an ``adapter_config.json``
    with PEFT's ``peft_type``. Our own adapters use the same file name but have a ``format``
    field and no ``peft_type``, so the two never get confused. Needs no optional package."""
    try:
        meta = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "peft_type" in meta and "format" not in meta


def is_hf_model_dir(path: str | Path) -> bool:
    """True if ``path`` is a saved HF model directory (a ``config.json`` with ``model_type``).

    Our own saved models have a ``config.json`` with a ``"format"``
    (:data:`probe.io.MODEL_FORMAT`) and no ``model_type``, so the two never get confused. Needs
    no optional package.
    """
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "format" not in meta


def _check_prefix_config(pm: Any, base: nn.Module, where: str) -> None:
    """Refuse a PEFT prefix adapter (a PeftModel, or its saved config as a namespace) made for
    another model shape, named in one line."""
    cfg, s = (_peft_cfg(pm), _shape(base)) if _is_peft(pm) else (pm, _shape(base))
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
        return
    if kind in PREFIX_PEFT_TYPES:
        want = {
            "num_layers": s.n_layers,
            "token_dim": s.n_kv_heads * s.d_head,
            "num_attention_heads": s.n_kv_heads,
        }
    else:
        want = {"token_dim": s.d_model}
    bad = [
        f"{k}={getattr(cfg, k)} (the model needs {v})"
        for k, v in want.items()
        if getattr(cfg, k, v) != v
    ]
    if bad:
        raise ValueError(
            f"{where}: this {kind} adapter was made for another model shape: "
            f"{', '.join(bad)}; use an adapter trained on this base model"
        )


def _check_adapter_base(adapter_dir: Path, base: nn.Module) -> dict:
    """Read adapter_config.json; the architecture mismatch check (a Llama adapter on GPT-2)."""
    try:
        meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{adapter_dir}/adapter_config.json is unreadable ({e})") from None
    recorded = meta.get("base_model_name_or_path") or ""
    cfg_path = Path(recorded) / "config.json" if recorded else None
    if cfg_path is not None and cfg_path.is_file():
        try:
            theirs = json.loads(cfg_path.read_text()).get("model_type")
        except (OSError, ValueError):
            theirs = None
        mine = base.config.model_type
        if theirs and theirs != mine:
            raise ValueError(
                f"{adapter_dir} was made for a {theirs} model ({recorded}) but the base model is "
                f"{mine}; load the adapter onto the model it was trained on"
            )
    return meta


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a saved PEFT adapter onto ``model`` and return the PeftModel (in eval mode).

    Prompt-learning adapters leave ``model``'s modules as they are; weight adapters (LoRA) wrap
    them in place (no copy of the model: call ``.unload()`` on the result to restore them).
    Mismatches (another architecture or width, missing weights) raise one-line ValueErrors."""
    libs = require_hf()
    adapter_dir = Path(adapter_dir)
    if not is_peft_adapter_dir(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} is not a saved PEFT adapter directory (no adapter_config.json); "
            "save one with peft_model.save_pretrained(dir)"
        )
    meta = _check_adapter_base(adapter_dir, model)
    _check_prefix_config(SimpleNamespace(**meta), model, str(adapter_dir))
    try:
        with warnings.catch_warnings():  # PEFT calls an API transformers deprecates; not ours
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            pm = libs.peft.PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        _unwrap_lora(model)
        first = next((ln.strip() for ln in str(e).splitlines() if "mismatch" in ln), None)
        first = first or message_line(e)
        raise ValueError(
            f"{adapter_dir} does not fit the base model {type(model).__name__} "
            f"(d_model={_shape(model).d_model}): {first.rstrip('.')}; use an adapter trained on "
            "this base model"
        ) from None
    _check_prefix_config(pm, model, str(adapter_dir))
    return pm.eval()


def _unwrap_lora(model: nn.Module) -> None:
    """Undo a failed in-place injection: put every tuner layer's base_layer back."""
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "base_layer") and name:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], mod.base_layer)


def load_hf_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"
) -> nn.Module:
    """Load a saved HF causal LM (offline, from a local directory) in eval mode.

    dtype: e.g. torch.float64 for the tightest check; None keeps the saved dtype. Missing or
    truncated weights raise a one-line ValueError."""
    libs = require_hf(peft=False)
    if not is_hf_model_dir(model_dir):
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model directory (no config.json with model_type)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = libs.transformers.AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype="auto" if dtype is None else dtype, local_files_only=True
            )
    except Exception as e:  # OSError, SafetensorError, ...: one line, naming the directory
        if isinstance(e, (MissingExtraError, KeyboardInterrupt)):
            raise
        msg = message_line(e) or type(e).__name__
        raise ValueError(
            f"cannot load the model weights in {model_dir} ({type(e).__name__}: {msg}); the "
            "weights are missing or truncated: save the model again with save_pretrained"
        ) from None
    _architecture(model)
    return model.to(device).eval()


def load_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved HF model directory and (optionally) a saved PEFT adapter directory.

    Returns (base model, keyword arguments for :func:`hf_records` / :func:`check_hf`): a
    prefix/prompt-tuning adapter becomes ``prefix=``; a weight adapter (LoRA, ...) becomes
    ``tuned_model=`` (injected into the loaded base, no copy; the base run switches it off),
    and so does an HF model directory given as ``adapter_dir`` (a fully fine-tuned model,
    loaded in the base's dtype).
    """
    base = load_hf_model(model_dir, dtype=dtype, device=device)
    if adapter_dir is None:
        return base, {}
    if is_hf_model_dir(adapter_dir):  # a fully fine-tuned copy
        return base, {"tuned_model": load_hf_model(adapter_dir, _dtype(base), device)}
    if not is_peft_adapter_dir(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} is neither a saved PEFT adapter directory (adapter_config.json) nor "
            "a Hugging Face model directory; save one with model.save_pretrained(dir)"
        )
    adapted = load_peft_adapter(base, adapter_dir)
    if _peft_cfg(adapted).is_prompt_learning:
        return base, {"prefix": adapted}
    return base, {"tuned_model": adapted}


def tokenize_texts(model_dir: str | Path, texts: Sequence[str]) -> list[Tensor]:
    """Token ids [1, T_i] per text, with the tokenizer saved in ``model_dir`` (its defaults, so a
    BOS token where the tokenizer adds one). One-line errors when there is no tokenizer."""
    libs = require_hf(peft=False)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to probe: give --text or a --text-file with non-empty lines")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = libs.transformers.AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True
            )
    except Exception as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ValueError(
            f"{model_dir} has no usable tokenizer ({type(e).__name__}); save one there with "
            "tokenizer.save_pretrained(dir), or probe token ids (--task)"
        ) from None
    out = [torch.tensor([tok(t)["input_ids"]], dtype=torch.long) for t in texts]
    empty = [i for i, t in enumerate(out) if t.shape[1] == 0]
    if empty:
        raise ValueError(f"text {empty[0] + 1} tokenizes to nothing")
    return out
