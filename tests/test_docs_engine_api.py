"""docs/engine_api.md matches the code: every name it cites exists where it says.

The doc's code blocks sit under headings naming a module (`he_models/engine.py`); inside a block,
`name(` is a function of that module, `Name.attr` an attribute of its class, `engine.x` / `keys.x` /
`embedder.x` attributes of the objects the block builds, and `he_models.a.B` dotted paths are imported.
StepOutput's documented fields must be its dataclass fields, no more, no fewer.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import pytest

from cipherbert.launch import REPO

DOC = (REPO / "docs" / "engine_api.md").read_text()
# local variable in the doc's examples -> how to find what it stands for
OBJECTS = {
    "engine": ("he_models.engine", "EncryptedEngine"),
    "keys": ("he_models.client", "ClientKeys"),
    "embedder": ("he_models.client", "Embedder"),
}
LOCALS = {"engine", "keys", "embedder", "ctx", "out", "geo", "inputs", "replies", "logits", "bundle", "safetensors"}


def sections() -> list[tuple[str, str]]:
    """(module, code) for each python block under a heading that names a he_models file."""
    found = []
    for heading, body in re.findall(r"^## .*?`(he_models/\w+\.py)`.*?\n(.*?)(?=^## |\Z)", DOC, re.S | re.M):
        module = heading[:-3].replace("/", ".")
        code = "\n".join(re.findall(r"```python\n(.*?)```", body, re.S))
        found.append((module, re.sub(r"#[^\n]*", "", code)))  # comments are prose
    return found


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_doc_has_the_sections_it_promises():
    assert {m for m, _ in sections()} >= {"he_models.wire", "he_models.engine", "he_models.client"}
    for path in re.findall(r"`(he_models/\w+\.py)`", DOC):
        assert (REPO / path).exists(), path


@pytest.mark.parametrize("module, code", sections(), ids=[m for m, _ in sections()])
def test_every_cited_name_exists(module, code):
    mod = importlib.import_module(module)
    code = re.sub(r'"[^"\n]*"|\'[^\'\n]*\'', '""', code)  # string literals are data, not names
    missing = []
    for name in set(re.findall(r"(?<![\w.@])([A-Za-z_]\w*)\(", code)) - LOCALS - {"list", "dict", "class", "slots"}:
        if not hasattr(mod, name) and name not in dir(__builtins__):
            missing.append(f"{module}.{name}")
    for cls, attr in re.findall(r"(?<![\w.])([A-Z]\w*)\.(\w+)", code):
        owner = getattr(mod, cls, None)
        if owner is None or not hasattr(owner, attr):
            missing.append(f"{module}.{cls}.{attr}")
    for var, attr in re.findall(r"(?<![\w.])(engine|keys|embedder)\.(\w+)", code):
        owner_mod, owner_cls = OBJECTS[var]
        owner = getattr(importlib.import_module(owner_mod), owner_cls)
        if not hasattr(owner, attr) and attr not in instance_attributes(owner):
            missing.append(f"{owner_cls}.{attr}")
    for dotted in re.findall(r"\b(he_models(?:\.\w+)+)", code):
        try:
            resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(dotted)
    assert not missing, f"docs/engine_api.md cites names the code lacks: {sorted(set(missing))}"


def instance_attributes(cls) -> set[str]:
    """Attributes an instance gets in __init__ (self.x = ...), read from the source."""
    import inspect

    return set(re.findall(r"self\.(\w+)\s*[:=]", inspect.getsource(cls.__init__)))


def test_step_output_fields_are_the_documented_ones():
    from he_models.contracts import StepOutput

    block = re.search(r"class StepOutput:\n(.*?)```", DOC, re.S)
    assert block, "the doc shows StepOutput"
    documented = re.findall(r"^\s{4}(\w+):", block.group(1), re.M)
    assert documented == [f.name for f in dataclasses.fields(StepOutput)]
    assert "frozen=True" in DOC and StepOutput.__dataclass_params__.frozen  # type: ignore[attr-defined]
