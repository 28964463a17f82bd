"""GET /ui: the in-browser client (clients/js/web), static files only, no build step.

The page runs the JavaScript client (clients/js/src) in a Web Worker: keys are generated and kept in
the browser (IndexedDB), the text is encrypted there, and this server only ever sees what the Python
SDK would send. Modules are served as they are in the repository, except that the bare package names
the Node build resolves (node-seal, fzstd, @huggingface/tokenizers) are pointed at their files under
/ui/vendor/ (the import map below; module workers cannot use a page's import map). The three vendor
packages come from `npm ci` in clients/js (`make setup`); without them /ui answers 503 with the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

JS_ROOT = Path(__file__).resolve().parents[2] / "clients" / "js"
ROOTS = {"web": JS_ROOT / "web", "src": JS_ROOT / "src", "vendor": JS_ROOT / "node_modules"}
VENDOR_PACKAGES = ("node-seal", "fzstd", "@huggingface/tokenizers")
IMPORT_MAP = {
    "node-seal/": "/ui/vendor/node-seal/",
    "fzstd": "/ui/vendor/fzstd/esm/index.mjs",
    "@huggingface/tokenizers": "/ui/vendor/@huggingface/tokenizers/dist/tokenizers.min.mjs",
}
_BARE = re.compile(r"""((?:from|import)\s*\(?\s*)(['"])(node-seal/[\w./-]+|fzstd|@huggingface/tokenizers)\2""")
MEDIA = {".js": "text/javascript", ".mjs": "text/javascript", ".html": "text/html", ".css": "text/css"}

router = APIRouter(tags=["ui"], include_in_schema=False)


def _resolve(specifier: str) -> str:
    for bare, target in IMPORT_MAP.items():
        if specifier == bare or (bare.endswith("/") and specifier.startswith(bare)):
            return target + specifier[len(bare) :] if bare.endswith("/") else target
    return specifier


def _file(area: str, path: str) -> Path | None:
    root = ROOTS[area].resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None
    if area == "vendor" and not any(target.is_relative_to(root / p) for p in VENDOR_PACKAGES):
        return None
    return target


@router.get("/ui")
async def ui_root() -> Response:
    return RedirectResponse("/ui/")


@router.get("/ui/{path:path}")
async def ui_file(path: str) -> Response:
    area, _, rest = path.partition("/")
    if area not in ("src", "vendor"):
        area, rest = "web", path or "index.html"
    if area == "vendor" and not ROOTS["vendor"].is_dir():
        return PlainTextResponse(
            "the page's JavaScript packages are missing: run `make setup` (npm ci in clients/js)", 503
        )
    target = _file(area, rest)
    if target is None:
        return PlainTextResponse("not found", 404)
    media = MEDIA.get(target.suffix)
    if media == "text/javascript" and area != "vendor":
        text = _BARE.sub(lambda m: f"{m[1]}{m[2]}{_resolve(m[3])}{m[2]}", target.read_text())
        return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})
    return FileResponse(target, media_type=media or "application/octet-stream", headers={"Cache-Control": "no-cache"})
