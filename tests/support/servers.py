"""A real uvicorn server on loopback serving one model directory, for the tests that need one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cipherbert.launch import Proc, start_server


def models_dir_with(root: Path, model_dir: Path, name: str = "rand") -> Path:
    """A models directory holding `model_dir` under `name` (a link: the model is not copied)."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / name).symlink_to(model_dir, target_is_directory=True)
    return models


@contextmanager
def serving(root: Path, model_dir: Path, *, key: str, secret: str | None = None, **options) -> Iterator[Proc]:
    """Serve `model_dir` as model "rand" to tenant acme with `key`; stopped on exit, even after a failure."""
    env = dict(options.pop("env", None) or {})
    if secret is not None:
        env["CIPHERBERT_SECRET"] = secret
    proc = start_server(
        root / "srv",
        api_keys=f"acme:{key}",
        models_dir=models_dir_with(root, model_dir),
        workers=options.pop("workers", 1),
        env=env,
        **options,
    )
    try:
        yield proc
    finally:
        proc.stop()
