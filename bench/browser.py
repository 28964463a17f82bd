"""The in-browser client against the Python SDK on the same server: `python -m bench.browser --n 10`.

Starts one real server (the shipped model), then for each of the first n SST-2 dev sentences runs the
Python SDK and the /ui page in headless Chromium (Debian's /usr/bin/chromium via playwright),
alternating so both see the same machine load. Writes bench/results/browser.json: label agreement,
max |logit difference|, the median end-to-end latency of each (the clients' own `latency`: embed,
encrypt, every round, decrypt; keys already registered), the browser's key generation time (in its
Web Worker), the bytes each way and the Chromium version. `--screenshot docs/browser-client.png`
saves the page after the last sentence.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.engine import DEFAULT_MODEL, RESULTS, machine_info
from cipherbert.data import load_sst2_dev
from cipherbert.launch import start_server
from clients.sdk import Client

KEY = "bench-browser-key-0001"
CHROMIUM = os.environ.get("CIPHERBERT_CHROMIUM", "/usr/bin/chromium")


def _wait_result(page, text: str) -> dict:
    page.evaluate("delete document.body.dataset.result")
    page.fill("#text", text)
    page.click("#go")
    page.wait_for_function(
        "!document.getElementById('go').disabled && (document.body.dataset.result"
        " || !document.getElementById('error').hidden)",
        timeout=600_000,
    )
    if page.is_visible("#error"):
        raise RuntimeError(f"the page reported: {page.text_content('#error')}")
    return json.loads(page.evaluate("document.body.dataset.result"))


def run(n: int, screenshot: str | None) -> dict:
    from playwright.sync_api import sync_playwright

    texts = [ex.text for ex in load_sst2_dev()[:n]]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "srv", api_keys=f"acme:{KEY}", models_dir=DEFAULT_MODEL.parent, workers=1)
        try:
            with Client(server.url, KEY, cache_dir=Path(tmp) / "sdk") as sdk, sync_playwright() as p:
                sdk.register_keys()
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(server.url + "/ui/")
                page.fill("#apikey", KEY)
                t0 = time.perf_counter()
                warm = _wait_result(page, "a warm-up sentence")  # keygen + key upload happen here
                first_s = time.perf_counter() - t0
                keygen_s = float(page.evaluate("document.body.dataset.keygenSeconds"))
                rows = []
                for text in texts:
                    py = sdk.classify(text)
                    js = _wait_result(page, text)
                    rows.append(
                        {
                            "text": text,
                            "python_logits": py.logits,
                            "browser_logits": js["logits"],
                            "python_s": py.latency_s,
                            "browser_s": js["latency"],
                            "python_up": py.upload_bytes,
                            "browser_up": js["bytes"]["up"],
                            "python_down": py.download_bytes,
                            "browser_down": js["bytes"]["down"],
                        }
                    )
                    print(f"{len(rows):2d} py {py.latency_s:5.2f} s  browser {js['latency']:5.2f} s  {text[:50]}")
                if screenshot:
                    page.screenshot(path=screenshot, full_page=True)
                version = browser.version
                browser.close()
        finally:
            server.stop()
    py_l, js_l = np.array([r["python_logits"] for r in rows]), np.array([r["browser_logits"] for r in rows])
    return {
        "n": n,
        "label_agreement": float(np.mean(py_l.argmax(1) == js_l.argmax(1))),
        "max_abs_logit_diff": float(np.abs(py_l - js_l).max()),
        "browser_e2e_p50_s": statistics.median(r["browser_s"] for r in rows),
        "python_e2e_p50_s": statistics.median(r["python_s"] for r in rows),
        "keygen_s": keygen_s,
        "chromium": version,
        "browser_first_inference_with_keys_s": first_s,
        "browser_key_upload_bytes": warm["bytes"]["keys"],
        "upload_bytes_p50": {
            "browser": statistics.median(r["browser_up"] for r in rows),
            "python": statistics.median(r["python_up"] for r in rows),
        },
        "download_bytes_p50": {
            "browser": statistics.median(r["browser_down"] for r in rows),
            "python": statistics.median(r["python_down"] for r in rows),
        },
        "load_average_1min": os.getloadavg()[0],
        "machine": machine_info(),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--screenshot", default=None)
    parser.add_argument("--out", default=str(RESULTS / "browser.json"))
    args = parser.parse_args()
    out = run(args.n, args.screenshot)
    Path(args.out).write_text(json.dumps(out, indent=1))
    ratio = out["browser_e2e_p50_s"] / out["python_e2e_p50_s"]
    print(
        f"agreement {out['label_agreement']:.0%}, max |diff| {out['max_abs_logit_diff']:.2e}, browser p50 "
        f"{out['browser_e2e_p50_s']:.2f} s vs Python {out['python_e2e_p50_s']:.2f} s ({ratio:.2f}x), "
        f"keygen {out['keygen_s']:.2f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
