"""How big and how fast a `probe view` page is for a GPT-2-small-shaped model (12 layers x 12
heads, d_model 768, 32 content tokens, a random P=4 key/value prefix), with random weights.

Prints the time to record and check the inputs, to build the payload, the page's size, and,
where playwright and a Chromium are installed, the time Chromium takes to load and draw it and
to redraw on a head switch. Offline; needs nothing beyond the package (playwright optional):

    python examples/view_cost.py                # float32, 4 inputs
    python examples/view_cost.py --dtype float64 --inputs 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from probe import ModelConfig, Transformer, probes
from probe import view as pv

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def draw_times(path: Path) -> tuple[float, float] | None:
    """(load and first draw, median redraw on a head switch) in ms, or None without a browser."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(path.as_uri())
        page.wait_for_selector(".ppv-content rect.ppv-cell")
        load = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        redraw = page.evaluate(
            """() => { const v = document.querySelector('.ppv').__ppv, out = [];
            for (let h = 0; h < 12; h++) { const t = performance.now(); v.state.head = h;
              v.state.layer = h % v.model().layers.length; v.draw();
              out.push(performance.now() - t); }
            return out; }"""
        )
        browser.close()
    return load, statistics.median(redraw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=12, n_heads=12, d_model=768, d_vocab=50257, n_ctx=1024, dropout=0.0)
    base = Transformer(cfg).to(getattr(torch, args.dtype))
    tokens = torch.randint(0, cfg.d_vocab, (args.inputs, args.tokens))
    _, cache = base.run_with_cache(tokens)
    prefix = probes.random_prefix(cache, cfg.n_layers, 4, torch.Generator().manual_seed(0))
    del cache

    start = time.perf_counter()
    records, check = pv.record(base, prefix, tokens)
    recorded = time.perf_counter() - start
    start = time.perf_counter()
    model = pv.ModelView(
        "random prefix, P=4", records, check, [f"t{t}" for t in tokens[0].tolist()]
    )
    page = pv.View.of([model], "GPT-2-small shape, random weights and prefix")
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = page.save(Path(tmp) / "view.html")
        size = path.stat().st_size
        times = draw_times(path)
    print(
        f"GPT-2-small shape, {args.dtype}: {args.inputs} inputs x {args.tokens} tokens, 144 heads"
    )
    print(f"record + check   {recorded:6.2f} s")
    print(f"payload + page   {built:6.2f} s")
    print(f"page size        {size / 1024:6.0f} KiB")
    if times is None:
        print("draw time        (no playwright + Chromium here)")
    else:
        print(f"load + draw      {times[0]:6.0f} ms (Chromium, navigation start to load end)")
        print(f"head switch      {times[1]:6.0f} ms (median redraw of 12 switches)")


if __name__ == "__main__":
    main()
