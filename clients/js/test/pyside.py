"""The Python/TenSEAL side of the JS interoperability tests (clients/js/test/interop.test.js).

    pyside.py make DIR    TenSEAL writes: its secret key, a seeded ciphertext, a mod-switched full one
    pyside.py eval DIR    TenSEAL loads the JS key upload (header, relin, Galois keys for every step),
                          the JS secret key and a JS seeded ciphertext; decrypts it; rotates it by every
                          step and squares it (relinearize, rescale) with the JS keys; writes the results
    pyside.py tokenize TOKENIZER_JSON MAX_TOKENS   ids of every SST-2 dev sentence (JSON lines on stdout)
    pyside.py sdk URL API_KEY TEXT...   the Python SDK's logits for the texts (JSON on stdout)

Values: slot i holds 3 sin(i). Runs with the repository on PYTHONPATH (he_models, tenseal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from he_models.ckks import CKKSParams, load_ciphertext, load_into, save_bytes, unpack_eval_keys
from he_models.client import ClientKeys

PARAMS = CKKSParams(8192, (55, 36, 36, 36, 55), 36)
STEPS = [-1024, -512, -256, -8, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
SST2_DEV = Path(__file__).resolve().parents[3] / "data" / "sst2-dev.tsv"
VALUES = 3 * np.sin(np.arange(PARAMS.slots))


def make(out: Path) -> None:
    keys = ClientKeys.generate(PARAMS, STEPS)
    seeded = keys.encrypt([VALUES])[0]
    ct = load_ciphertext(keys.context, seeded)
    seal.Evaluator(keys.context).mod_switch_to_next_inplace(ct)
    (out / "py_sk.bin").write_bytes(save_bytes(keys._secret))
    (out / "py_ct_seeded.bin").write_bytes(seeded)
    (out / "py_ct_full.bin").write_bytes(save_bytes(ct))


def evaluate(out: Path) -> None:
    ctx = PARAMS.seal_context()
    header, relin_bytes, galois_bytes = unpack_eval_keys((out / "js_keys.cbf1").read_bytes())
    assert header.params == PARAMS.to_dict() and sorted(header.galois_steps) == STEPS, header
    relin = load_into(seal.RelinKeys(), ctx, relin_bytes, "JS relin keys")
    galois = load_into(seal.GaloisKeys(), ctx, galois_bytes, "JS Galois keys")
    tool = ctx.key_context_data().galois_tool()
    missing = [s for s in STEPS if not galois.has_key(tool.get_elt_from_step(s))]
    assert not missing, f"Galois keys lack steps {missing}"
    secret = load_into(seal.SecretKey(), ctx, (out / "js_sk.bin").read_bytes(), "JS secret key")
    ct = load_ciphertext(ctx, (out / "js_ct.bin").read_bytes(), "JS ciphertext")
    assert ctx.get_context_data(ct.parms_id()).chain_index() == len(PARAMS.coeff_mod_bit_sizes) - 2
    encoder, decryptor = seal.CKKSEncoder(ctx), seal.Decryptor(ctx, secret)
    pt = seal.Plaintext()
    decryptor.decrypt(ct, pt)
    err = float(np.abs(np.array(encoder.decode_double(pt)) - VALUES).max())
    evaluator = seal.Evaluator(ctx)
    for step in STEPS:
        rotated = seal.Ciphertext()
        evaluator.rotate_vector(ct, step, galois, rotated)
        (out / f"py_rot_{step}.bin").write_bytes(save_bytes(rotated))
    squared = seal.Ciphertext()
    evaluator.square(ct, squared)
    evaluator.relinearize_inplace(squared, relin)
    evaluator.rescale_to_next_inplace(squared)
    (out / "py_square.bin").write_bytes(save_bytes(squared))
    print(json.dumps({"js_ct_decrypt_max_err": err, "relin_size": relin.size(), "steps": len(STEPS)}))


def tokenize(tokenizer_json: str, max_tokens: int) -> None:
    import csv

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.enable_truncation(max_length=max_tokens)
    tok.no_padding()
    with open(SST2_DEV, newline="", encoding="utf-8") as fh:  # the corpus cipherbert.data ships
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            print(json.dumps({"text": row["sentence"], "ids": tok.encode(row["sentence"]).ids}))


def sdk(url: str, api_key: str, texts: list[str]) -> None:
    """The Python SDK's logits for the same texts on the same server (JSON on stdout)."""
    import tempfile

    from clients.sdk import Client

    with tempfile.TemporaryDirectory() as home, Client(url, api_key, cache_dir=home) as client:
        print(json.dumps([client.classify(t).logits for t in texts]))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(Path(sys.argv[2]))
    elif cmd == "eval":
        evaluate(Path(sys.argv[2]))
    elif cmd == "tokenize":
        tokenize(sys.argv[2], int(sys.argv[3]))
    elif cmd == "sdk":
        sdk(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(__doc__)
