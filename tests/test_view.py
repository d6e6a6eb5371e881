"""probe.view: the payload's numbers (no browser), `probe view`, and the page in a real headless
Chromium (Debian's `chromium`, driven by playwright): heads rendered, selection, the renormalised
content pattern equal to the base's for a prefix and not for full fine-tuning, no console
errors, a non-blank screenshot."""

import copy
import io
import re
import shutil
import subprocess
import sys

import pytest
import torch

from prefix_probe.cli import main
from probe import Transformer, check, preset, probes
from probe import view as pv
from probe.adapters import make_adapter
from tasks import get_task, test_set

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def models():
    """A float64 tiny base (2 layers x 2 heads), a P=2 prefix with random keys and values, and a
    fully fine-tuned copy whose W_Q and W_K moved; 3 sort_asc inputs of 19 tokens."""
    torch.manual_seed(0)
    base = Transformer(preset("tiny")).double()
    prefix = make_adapter("prefix", base, length=2)
    full = copy.deepcopy(base)
    with torch.no_grad():
        for p in prefix.parameters():
            p.normal_()
        for name, p in full.named_parameters():
            if "W_Q" in name or "W_K" in name:
                p.add_(0.5 * torch.randn_like(p))
    return base, prefix, full, test_set(get_task("sort_asc"), 3).tokens[:, :-1]


@pytest.fixture(scope="module")
def page_data():
    base, prefix, full, tokens = models()
    return pv.View.of(
        [
            pv.model_view("prefix", base, prefix, tokens),
            pv.model_view("full FT", base, full, tokens),
        ],
        "tiny: prefix vs full fine-tuning",
    )


# ------------------------------------------------------------------------------- no browser


def test_tuned_records_hold_each_tunings_prefix_and_premise():
    """check.tuned_records (what check_tuned checks, and what the view draws): the prefix per
    layer (a soft prompt's positions join it) and where the identities are expected."""
    base, prefix, full, tokens = models()
    prompt = make_adapter("prompt", base, length=3)
    lora = make_adapter("lora", base, rank=2, targets=["W_Q"])
    for tuned, P, expected in ((prefix, 2, True), (prompt, 3, True), (full, 0, False)):
        records, base_records, exp = check.tuned_records(base, tuned, tokens)
        assert [r.P for r in records] == [P, P] and exp == [expected, expected]
        assert [r.P for r in base_records] == [0, 0]
        assert records[0].pattern.shape == (3, 2, 19, P + 19)
    records, _, exp = check.tuned_records(base, prefix.prefix(base), tokens)  # raw prefix
    assert exp == [True, True] and records[1].P == 2
    assert check.tuned_records(base, lora, tokens)[2] == [False, False]  # no prefix at all


def test_payload_renormalised_equals_base_for_a_prefix_only(page_data):
    prefix, full = page_data.data["models"]
    assert prefix["P"] == 2 and full["P"] == 0
    for layer in prefix["layers"]:
        for h in layer["heads"]:
            assert h["content"] == h["base"]  # float64 differences ~1e-16, far below 0.001
            assert h["stats"]["check"] == "ok" and h["stats"]["bias_rank"] <= 2
            assert max(h["norms"]["residual"]) < 1e-12
            assert all(0 < a < 1 for a in h["alpha"])
    moved = [h["content"] != h["base"] for layer in full["layers"] for h in layer["heads"]]
    assert all(moved)
    assert full["layers"][0]["heads"][0]["stats"]["check"] == "-"  # no identity expected
    # rows are causal and sum to 1 in units of 0.001 (to rounding)
    rows = prefix["layers"][1]["heads"][1]["content"]
    assert [len(r) for r in rows] == list(range(1, 20))
    assert all(abs(sum(r) - 1000) <= len(r) for r in rows)


def test_payload_raw_prefix_columns_are_alpha():
    base, prefix, _, tokens = models()
    data = pv.View.of([pv.model_view("p", base, prefix, tokens)]).data
    for layer in data["models"][0]["layers"]:
        for h in layer["heads"]:
            mass = [sum(row) / 1000 for row in h["prefix"]]
            assert all(abs(m - a) <= 0.002 for m, a in zip(mass, h["alpha"], strict=True))


def test_truncation_is_exact_and_subsampling_is_stated(page_data):
    base, prefix, _, tokens = models()
    m = pv.model_view("p", base, prefix, tokens, example=2)
    full = pv.payload([m], "t", pv.ViewConfig(example=2))
    cut = pv.payload([m], "t", pv.ViewConfig(max_positions=7, max_heads=2, example=2))
    assert len(cut["models"][0]["tokens"]) == 7
    assert any("first 7 of 19" in n for n in cut["notes"])
    assert [layer["layer"] for layer in cut["models"][0]["layers"]] == [0]
    assert any("1 of 2 layers" in n for n in cut["notes"])
    a, b = full["models"][0]["layers"][0]["heads"][1], cut["models"][0]["layers"][0]["heads"][1]
    assert b["content"] == a["content"][:7] and b["prefix"] == a["prefix"][:7]
    assert b["alpha"] == a["alpha"][:7]
    assert full["models"][0]["tokens"] == [str(t) for t in tokens[2].tolist()]
    assert pv._pick(12, 4) == [0, 4, 7, 11] and pv._pick(3, 5) == [0, 1, 2]


def test_bad_input_is_named():
    base, prefix, _, tokens = models()
    with pytest.raises(ValueError, match="max_positions"):
        pv.ViewConfig(max_positions=0)
    with pytest.raises(ValueError, match="digits"):
        pv.ViewConfig(digits=9)
    with pytest.raises(ValueError, match="example 5"):
        pv.model_view("p", base, prefix, tokens, example=5)
    m = pv.model_view("p", base, prefix, tokens)
    with pytest.raises(ValueError, match="token strings"):
        pv.ModelView("p", m.records, m.check, ["a", "b"])
    with pytest.raises(ValueError, match="records but the check"):
        pv.ModelView("p", m.records[:1], m.check, m.tokens)
    with pytest.raises(ValueError, match="different"):
        small = Transformer(preset("01")).double()
        other = pv.model_view(
            "q", small, probes.random_prefix(small.run_with_cache(tokens)[1], 1, 1), tokens
        )
        pv.payload([m, other], "t")
    with pytest.raises(ValueError, match=r"\.html"):
        pv.View.of([m]).save("/tmp/x.png")


def test_page_is_self_contained(page_data, tmp_path):
    text = page_data.save(tmp_path / "v.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and "PrefixProbeView.mount" in text
    for fetch in ('src="', "src='", 'href="http', "url(", "import(", "fetch(", "XMLHttpRequest"):
        assert fetch not in text, fetch
    fragment = page_data._repr_html_()  # the notebook's inline form: a div, CSS, script, data
    assert fragment.startswith('<div class="ppv" id="ppv-') and "<html" not in fragment
    assert not list(tmp_path.glob("*.tmp"))


def test_page_bytes_depend_on_the_data_alone():
    """A regenerated page is byte-identical (its element ids come from its content), while the
    same view shown twice in one notebook still gets two distinct ids."""
    script = "from probe.view import html_page; print(html_page({'n': 1}))"
    pages = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert pages[0] == pages[1] and 'id="ppv-' in pages[0]
    ids = {re.search(r'id="(ppv-[^"]+)"', pv.html_fragment({"n": 2})).group(1) for _ in range(2)}
    assert len(ids) == 2


def test_cli_writes_a_page(tmp_path, capsys):
    base, prefix, full, _ = models()
    base.save(tmp_path / "base")
    prefix.save(tmp_path / "prefix", base)
    full.save(tmp_path / "full")
    out = tmp_path / "view.html"
    argv = ["view", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "prefix")]
    argv += ["--adapter", str(tmp_path / "full"), "--n", "2", "--example", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "2 model(s), 2 of 2 layers x 2 heads" in capsys.readouterr().out
    text = out.read_text()
    assert '"name":"prefix"' in text and '"name":"full"' in text
    assert main(["view", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "v.png")]) == 2
    assert ".html" in capsys.readouterr().err
    assert (
        main(["view", "--base", str(tmp_path / "base"), "--example", "9", "--out", str(out)]) == 2
    )
    assert "example 9" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_hf_models_view_and_cli(tmp_path, capsys):
    """A tiny GPT-2 with a PEFT prefix (renormalised == base) and a LoRA on c_attn (not)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64)
    base = transformers.GPT2LMHeadModel(cfg).eval().double()
    prefix_cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    prefix = peft.get_peft_model(copy.deepcopy(base), prefix_cfg).eval()
    lora_cfg = peft.LoraConfig(
        target_modules=["c_attn"], r=2, init_lora_weights=False, fan_in_fan_out=True
    )
    lora = peft.get_peft_model(copy.deepcopy(base), lora_cfg).eval()
    tokens = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    data = pv.view(base, {"prefix": prefix, "lora": lora}, tokens).data
    heads = [[h for layer in m["layers"] for h in layer["heads"]] for m in data["models"]]
    assert all(h["content"] == h["base"] and h["stats"]["check"] == "ok" for h in heads[0])
    assert any(h["content"] != h["base"] for h in heads[1])
    assert data["models"][0]["P"] == 2 and data["models"][0]["tokens"] == [
        str(t) for t in tokens[0].tolist()
    ]

    base.save_pretrained(tmp_path / "gpt2")
    prefix.save_pretrained(tmp_path / "prefix")
    out = tmp_path / "hf.html"
    argv = ["view", "--base", str(tmp_path / "gpt2"), "--adapter", str(tmp_path / "prefix")]
    assert main([*argv, "--n", "2", "--task", "copy", "--example", "1", "--out", str(out)]) == 0
    assert (
        "1 model(s), 2 of 2 layers x 2 heads, input 1 of 2 copy inputs" in capsys.readouterr().out
    )
    assert "PEFT" in out.read_text()


# ------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
    )
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (Debian) to run these")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def opened(browser, page_data, tmp_path):
    """The page open in Chromium, and the console errors and page errors it logs."""
    path = page_data.save(tmp_path / "view.html")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector(".ppv-content rect.ppv-cell")
    yield page, errors
    page.close()


def values(page, kind: str) -> list[str]:
    return page.eval_on_selector_all(
        f".ppv-{kind} rect.ppv-cell",
        "cells => cells.map(c => c.dataset.i + ',' + c.dataset.j + '=' + c.dataset.v)",
    )


def test_page_renders_every_head_and_selection_redraws(opened):
    page, errors = opened
    assert page.locator(".ppv-head-cell").count() == 2 * 2  # 2 layers x 2 heads
    assert len(values(page, "raw")) == 19 * 2 + 19 * 20 // 2  # prefix columns + causal content
    before = values(page, "raw")
    page.select_option("select.ppv-head", "1")
    assert page.locator(".ppv").get_attribute("data-head") == "1"
    assert values(page, "raw") != before
    page.click(".ppv-head-cell[data-layer='1'][data-head='0']")
    assert page.locator(".ppv").get_attribute("data-layer") == "1"
    assert page.locator("select.ppv-layer").input_value() == "1"
    assert page.locator(".ppv-head-cell.ppv-selected").count() == 1
    assert not errors


def test_renormalised_equals_base_for_the_prefix_and_not_for_full_ft(opened, page_data):
    page, errors = opened
    for layer in range(2):
        for head in range(2):
            page.select_option("select.ppv-layer", str(layer))
            page.select_option("select.ppv-head", str(head))
            content, base = values(page, "content"), values(page, "base")
            assert len(content) == 19 * 20 // 2 and content == base
            expected = page_data.data["models"][0]["layers"][layer]["heads"][head]["content"]
            assert content[-1].endswith(f"={expected[-1][-1] / 1000:.3f}")
            assert page.locator(".ppv-stats td.ppv-ok").count() == 1
    page.select_option("select.ppv-model", "1")  # full fine-tuning: the must-fail side
    assert values(page, "content") != values(page, "base")
    assert not errors


def test_hover_shows_tokens_and_values(opened):
    page, errors = opened
    page.hover(".ppv-content rect.ppv-cell[data-i='6'][data-j='3']")
    tip = page.locator(".ppv-tip")
    assert tip.is_visible()
    text = tip.inner_text()
    assert "query 6" in text and "key 3" in text and "renormalised" in text and "base" in text
    assert page.locator(".ppv-base rect.ppv-hot").count() == 1
    page.hover(".ppv-decomp circle.ppv-dot[data-i='4']")
    assert "residual" in tip.inner_text()
    assert not errors


def test_screenshot_is_not_blank(opened, tmp_path):
    import matplotlib.image

    page, errors = opened
    png = page.screenshot(full_page=True)
    (tmp_path / "view.png").write_bytes(png)
    pixels = matplotlib.image.imread(io.BytesIO(png))[..., :3]
    inked = (pixels.min(-1) < 0.9).mean()  # share of pixels that are not near-white
    assert pixels.shape[0] > 600 and 0.03 < inked < 0.9, inked
    assert len({tuple(p) for p in pixels[::7, ::7].reshape(-1, 3).round(2).tolist()}) > 20
    assert not errors
