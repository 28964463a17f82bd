"""The wire protocol's machine-readable half: layouts as slot formulas, each round's tensors, frame counts.

This module is the single source of the tables in docs/protocol.md (`python -m he_models.protocol_spec`
prints them; tests/test_protocol_spec.py fails when the doc and this module differ) and of the checks
that the engine packs and counts exactly as written (tests/test_protocol_spec.py runs the real engine
at several lengths against these formulas). Nothing here imports the engine or the layout code: the
formulas are strings, Python expressions over the named quantities below, so an independent client can
copy them from the doc and evaluate them as they stand.

Conventions: `//` is floor division, `%` the remainder, `cdiv(a, b)` = ceil(a / b), `block(n)` = the
smallest of 32, 64, 128 that is >= n. A layout maps logical indices to a *global slot* g; g lives in
ciphertext g // S at slot g % S. Every slot no formula addresses holds 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from he_models.ckks import KEYS_FORMAT, MAX_BITS_128
from he_models.layout import PROTOCOL

TOKEN_BLOCKS = (32, 64, 128)
CHUNK = 32
FRAME_MAGIC = b"CBF1"
EMBEDDING_LAYERNORM_EPS = 1e-12


def cdiv(a, b):
    """ceil(a / b) for non-negative integers (numpy arrays too)."""
    return -(-a // b)


def block(n: int) -> int:
    for size in TOKEN_BLOCKS:
        if n <= size:
            return size
    raise ValueError(f"{n} tokens exceed {TOKEN_BLOCKS[-1]}")


# Quantities every formula may use, in the order they are defined. Inputs come from the bundle
# (hidden_size, num_heads, intermediate_size, num_labels, ckks.poly_modulus_degree) and the sentence (n).
QUANTITIES: tuple[tuple[str, str, str], ...] = (
    ("n", "input", "number of tokens of the sentence (after truncation to max_tokens), 1..max_tokens"),
    ("S", "poly_modulus_degree // 2", "slots per ciphertext"),
    ("H", "hidden_size", "hidden features"),
    ("I", "intermediate_size", "FFN features"),
    ("heads", "num_heads", "attention heads"),
    ("dh", "H // heads", "features per head: feature f belongs to head f // dh, position f % dh"),
    ("n_p", "block(n)", "token block: the smallest of 32, 64, 128 that is >= n"),
    ("B", "max(n_p, dh)", "block length of the score and token-major layouts"),
    ("C", "cdiv(n, 32)", "feature-major chunks of 32 tokens"),
    ("L", "num_labels", "labels (logits per text, or per token for a token-classification model)"),
)

# The bundle's `task` (Hugging Face pipeline names) decides the final envelope's kind.
TASKS = ("text-classification", "token-classification")
FINAL_KINDS = {"text-classification": "logits", "token-classification": "token_logits"}


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    indices: str  # logical indices and their ranges
    value: str  # what the slot holds, for a matrix X (n, F) or a per-head tensor
    slot: str  # global slot, a Python expression
    frames: str  # ciphertexts the layout fills, a Python expression
    features: bool  # whether the layout has a feature count F


LAYOUTS: dict[str, Layout] = {
    "FM": Layout(
        "FM",
        "feature-major, chunked",
        "t in 0..n-1, f in 0..F-1",
        "X[t, f]",
        "(t // 32) * cdiv(32 * F, S) * S + f * 32 + t % 32",
        "C * cdiv(32 * F, S)",
        True,
    ),
    "SL": Layout(
        "SL",
        "scores",
        "h in 0..heads-1, k in 0..n-1, i in 0..n-1",
        "M[h, k, i] (key k, query i)",
        "(h * n + k) * B + i",
        "cdiv(heads * n * B, S)",
        False,
    ),
    "TM": Layout(
        "TM",
        "token-major per head",
        "h in 0..heads-1, k in 0..n-1, d in 0..dh-1",
        "X[k, h * dh + d]",
        "(h * n + k) * B + d",
        "cdiv(heads * n * B, S)",
        False,
    ),
}


@dataclass(frozen=True)
class Tensor:
    kind: str  # round kind
    direction: str  # "server" (sent by the server) or "client" (the client's reply)
    position: int  # order within the message, from 1
    name: str
    layout: str
    features: str  # "H", "I" or "-"
    value: str


ROUND_KINDS = ("scores", "context", "refresh", "refresh")  # per encoder layer, in this order

# Q~ = Q + rQ etc.: the server's masked matrices as the client decrypts them (n, H). Every reply is
# fresh: encrypted at the top level with every padding slot 0.
TENSORS: tuple[Tensor, ...] = (
    Tensor("start", "client", 1, "E", "FM", "H", "E = embeddings (n, H), see Embedding"),
    Tensor("scores", "server", 1, "Q~", "FM", "H", "Q + rQ"),
    Tensor("scores", "server", 2, "K~", "FM", "H", "K + rK"),
    Tensor("scores", "client", 1, "R", "SL", "-", "R[h, k, i] = sigma * sum_d Q~[i, h*dh+d] * K~[k, h*dh+d]"),
    Tensor("scores", "client", 2, "K~", "TM", "-", "K~ as decrypted, re-packed token-major"),
    Tensor("context", "server", 1, "A~", "SL", "-", "A + rA (attention weights per head, [h, k, i])"),
    Tensor("context", "server", 2, "V~", "FM", "H", "V + rV"),
    Tensor("context", "client", 1, "P", "FM", "H", "P[i, h*dh+e] = context_scale * sum_k A~[h, k, i] * V~[k, h*dh+e]"),
    Tensor("context", "client", 2, "A~", "SL", "-", "A~ as decrypted, re-encrypted"),
    Tensor("refresh", "server", 1, "X~", "FM", "H", "X + rX (hidden state)"),
    Tensor("refresh", "client", 1, "X~", "FM", "H", "X~ as decrypted (token slots t >= n set to 0)"),
    Tensor(
        "logits", "server", 1, "L", "slot 0", "-", "one ciphertext per label c = 0..num_labels-1: logit c in slot 0"
    ),
    Tensor("token_logits", "server", 1, "T", "FM", "L", "T[t, c] = logit of label c for token t (no pooling)"),
)

ROUND_META: tuple[tuple[str, str, str, str], ...] = (
    ("protocol", "every round, logits and token_logits", "string", f"protocol version, {PROTOCOL!r}; refuse any other"),
    (
        "geometry",
        "every round and token_logits",
        "object",
        "{n, n_p, hidden, heads, intermediate, slots}: must equal the client's own n, block(n), H, heads, I, S",
    ),
    (
        "tensors",
        "every round and token_logits",
        "object",
        '{"send": [...], "reply": [...]}: the tensors of this message and of the reply the server expects, in '
        "frame order, each {tensor, layout, features, frames}; must equal the tables above for the round's kind "
        "and n",
    ),
    ("sigma", "scores", "number", "factor of the client's product R (1/sqrt(n) times the model's gains)"),
    ("context_scale", "context", "number", "factor of the client's product P (1/a_gain)"),
    ("num_labels", "logits, token_logits", "integer", "number of labels (logits: of logit ciphertexts)"),
    ("labels", "logits, token_logits", "list of strings", "label names, index = logit index"),
)

KEY_HEADER: tuple[tuple[str, str, str, str], ...] = (
    (
        "params",
        "required",
        "object",
        "exactly the bundle's `ckks` object: {poly_modulus_degree, coeff_mod_bit_sizes, scale_bits}",
    ),
    (
        "galois_steps",
        "required",
        "list of integers",
        "rotation steps of the Galois keys: must include "
        "every step in the bundle's `galois_steps` (signed steps, not Galois elements)",
    ),
    ("format", "optional", "string", f"if present, {KEYS_FORMAT!r}"),
    ("parts", "optional", "list of strings", 'if present, ["relin_keys", "galois_keys"]'),
)


def round_kind(round_no: int, layers: int, task: str = "text-classification") -> str:
    """Kind of round r (1-based); round layers*4 + 1 is the logits (`token_logits` for a token model)."""
    if round_no == 4 * layers + 1:
        return final_kind(task)
    return ROUND_KINDS[(round_no - 1) % 4]


def final_kind(task: str) -> str:
    """The kind of the envelope that ends an inference, for the bundle's task."""
    if task not in FINAL_KINDS:
        raise ValueError(f"unknown task {task!r}; this protocol knows {list(TASKS)}")
    return FINAL_KINDS[task]


# -- evaluating the formulas ---------------------------------------------------------------------


def quantities(
    n: int, hidden_size: int, num_heads: int, intermediate_size: int, poly_modulus_degree: int, num_labels: int = 2
) -> dict:
    """The named quantities, each computed from its formula in QUANTITIES."""
    env: dict = {
        "n": n,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "num_labels": num_labels,
        "poly_modulus_degree": poly_modulus_degree,
    }
    for name, formula, _ in QUANTITIES:
        if formula != "input":
            env[name] = evaluate(formula, env)
    return env


def evaluate(formula: str, env: dict, **indices):
    """Evaluate a formula of this module (a Python expression) with cdiv, block and max available."""
    names = {"cdiv": cdiv, "block": block, "max": max, "__builtins__": {}}
    return eval(formula, names, {**env, **indices})  # noqa: S307 (the formulas are this module's constants)


def frames(layout: str, env: dict, features: int | None = None) -> int:
    return int(evaluate(LAYOUTS[layout].frames, env, F=features))


def message_frames(kind: str, direction: str, env: dict, num_labels: int = 2) -> int:
    """Frames (ciphertexts) in one message of a round, as the tables say."""
    if kind == "logits":
        return num_labels
    total = 0
    for t in TENSORS:
        if t.kind == kind and t.direction == direction:
            features = None if t.features == "-" else env[t.features]
            total += frames(t.layout, env, features)
    return total


def describe(kind: str, direction: str, env: dict) -> list[dict]:
    """One message's tensors as explicit descriptors (name, layout, features, frames), in frame order."""
    out = []
    for t in TENSORS:
        if t.kind == kind and t.direction == direction:
            features = None if t.features == "-" else int(env[t.features])
            out.append(
                {"tensor": t.name, "layout": t.layout, "features": features, "frames": frames(t.layout, env, features)}
            )
    return out


def round_tensors(kind: str, geometry: dict, num_labels: int = 2) -> dict:
    """meta["tensors"] of a round (protocol /4): what the server sends and the reply it expects."""
    env = env_of_geometry(geometry, num_labels)
    return {"send": describe(kind, "server", env), "reply": describe(kind, "client", env)}


def bundle_protocol_fields(
    layers: int, coeff_mod_bit_sizes: list[int], scale_bits: int, task: str = "text-classification"
) -> dict:
    """What a bundle announces about the rounds and the client's own arithmetic (protocol /4)."""
    return {
        "task": task,
        "round_kinds": [round_kind(r, layers) for r in range(1, 4 * layers + 1)],
        "headroom_bits": headroom_bits(coeff_mod_bit_sizes, scale_bits),
        "embedding": {"layernorm_eps": EMBEDDING_LAYERNORM_EPS, "positions_from": 0},
    }


def env_of_geometry(geometry: dict, num_labels: int = 2) -> dict:
    """The quantities for a meta `geometry` object {n, n_p, hidden, heads, intermediate, slots}."""
    return quantities(
        int(geometry["n"]),
        int(geometry["hidden"]),
        int(geometry["heads"]),
        int(geometry["intermediate"]),
        2 * int(geometry["slots"]),
        int(num_labels),
    )


def security_bits_ok(poly_modulus_degree: int, coeff_mod_bit_sizes: list[int]) -> bool:
    """128-bit classical security (HomomorphicEncryption.org table): total modulus bits under the bound."""
    bound = MAX_BITS_128.get(int(poly_modulus_degree))
    return bound is not None and sum(int(b) for b in coeff_mod_bit_sizes) <= bound


def headroom_bits(coeff_mod_bit_sizes: list[int], scale_bits: int) -> int:
    """|value| at the last level must stay below 2^headroom: base prime - scale - 1 bits."""
    return int(coeff_mod_bit_sizes[0]) - int(scale_bits) - 1


# -- rendering the doc's tables --------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(s: str) -> str:
    return f"`{s}`"


def render_sections() -> dict[str, str]:
    """Markdown tables for docs/protocol.md, keyed by the name of their generated section."""
    layouts = [(_code(x.name), x.title, x.indices, x.value, _code(x.slot), _code(x.frames)) for x in LAYOUTS.values()]
    tensors = [(t.kind, t.direction, t.position, _code(t.name), t.layout, t.features, t.value) for t in TENSORS]
    return {
        "quantities": _table(("name", "formula", "meaning"), [(_code(n), _code(f), m) for n, f, m in QUANTITIES]),
        "layouts": _table(("layout", "title", "indices", "slot holds", "global slot", "frames"), layouts),
        "tensors": _table(("round kind", "sent by", "position", "tensor", "layout", "F", "value"), tensors),
        "meta": _table(("field", "in", "type", "meaning"), list(ROUND_META)),
        "key_header": _table(("field", "presence", "type", "value"), list(KEY_HEADER)),
        "frame_counts": render_frame_counts(),
    }


def render_frame_counts(hidden: int = 128, heads: int = 2, intermediate: int = 512, degree: int = 8192) -> str:
    """Worked frame counts for the shipped geometry (he-bert-tiny-rt) at a few lengths."""
    rows = []
    for n in (1, 5, 32, 33, 64, 70, 128):
        env = quantities(n, hidden, heads, intermediate, degree)
        counts = [
            message_frames(k, d, env)
            for k, d in (
                ("start", "client"),
                ("scores", "server"),
                ("scores", "client"),
                ("context", "server"),
                ("context", "client"),
                ("refresh", "server"),
            )
        ]
        rows.append((n, env["n_p"], env["B"], env["C"], *counts))
    return _table(
        (
            "n",
            "n_p",
            "B",
            "C",
            "start",
            "scores sent",
            "scores reply",
            "context sent",
            "context reply",
            "refresh (each way)",
        ),
        rows,
    )


BEGIN = "<!-- generated:{name} (python -m he_models.protocol_spec) -->"
END = "<!-- end generated:{name} -->"


def render_doc(text: str) -> str:
    """docs/protocol.md with every generated section replaced by this module's rendering."""
    for name, body in render_sections().items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"docs/protocol.md lacks the generated section {name!r}")
        text = text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]
    return text


def main() -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Render or check docs/protocol.md's generated tables.")
    parser.add_argument("--doc", default=str(Path(__file__).resolve().parent.parent / "docs" / "protocol.md"))
    parser.add_argument("--write", action="store_true", help="rewrite the doc in place")
    args = parser.parse_args()
    path = Path(args.doc)
    new = render_doc(path.read_text())
    if args.write:
        path.write_text(new)
    else:
        print(new)


if __name__ == "__main__":
    main()
