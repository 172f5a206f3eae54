#!/usr/bin/env python3
"""Reference outputs of all-MiniLM-L6-v2 for Kiln's parity test.

Runs offline on the files scripts/fetch-minilm.sh puts in Kiln's cache: token
ids from the `tokenizers` package reading the model's own tokenizer.json (with
its padding and truncation turned off), and a BERT forward pass written here in
NumPy, in float64, straight from the equations (post-LayerNorm blocks, exact erf
GELU, eps 1e-12), then sentence-transformers' mean pooling and L2 normalisation.

Writes tests/data/minilm-reference.json (sentences, ids, shapes) and
tests/data/minilm-reference.bin (little-endian f32: each sentence's
last_hidden_state [tokens, 384], then the [sentences, 384] normalised
embeddings, then the [sentences, 384] pooler outputs tanh(W h_[CLS] + b)).
Needs: numpy, tokenizers (pip install numpy tokenizers).
"""

import json
import math
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

SENTENCES = [
    "Kiln trains neural networks on any GPU.",
    "The movie was surprisingly good, and the soundtrack was wonderful!",
    "Café naïve résumé: accents are stripped by the uncased tokenizer.",
    "A much longer sentence follows, written to exercise the attention over more positions, "
    "with numbers like 1,024 and 3.14159, hyphenated-words, and a question at the end?",
]


def cache_dir():
    # Empty variables count as unset, as in the fetch scripts and Kiln.
    if os.environ.get("KILN_CACHE"):
        return os.environ["KILN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kiln")


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[8 + n + start : 8 + n + end], dtype="<f4")
        tensors[name] = raw.reshape(info["shape"]).astype(np.float64)
    return tensors


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def bert(t, ids, cfg):
    p = lambda name: t[name]
    linear = lambda x, name: x @ p(name + ".weight").T + p(name + ".bias")
    eps = cfg["layer_norm_eps"]
    n = len(ids)
    x = p("embeddings.word_embeddings.weight")[ids]
    x = x + p("embeddings.position_embeddings.weight")[:n]
    x = x + p("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), eps)
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    for l in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{l}."
        split = lambda y: y.reshape(n, heads, d).transpose(1, 0, 2)
        q = split(linear(x, pre + "attention.self.query"))
        k = split(linear(x, pre + "attention.self.key"))
        v = split(linear(x, pre + "attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, heads * d)
        attn = linear(context, pre + "attention.output.dense")
        x = layer_norm(
            x + attn,
            p(pre + "attention.output.LayerNorm.weight"),
            p(pre + "attention.output.LayerNorm.bias"),
            eps,
        )
        inter = gelu(linear(x, pre + "intermediate.dense"))
        out = linear(inter, pre + "output.dense")
        x = layer_norm(
            x + out, p(pre + "output.LayerNorm.weight"), p(pre + "output.LayerNorm.bias"), eps
        )
    return x


def main():
    model = os.path.join(cache_dir(), "minilm")
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        sys.exit(f"no model in {model}: run scripts/fetch-minilm.sh first")
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    tokenizer = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tensors = read_safetensors(os.path.join(model, "model.safetensors"))

    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
    ids, hidden, pooled, pooler = [], [], [], []
    for sentence in SENTENCES:
        encoding = tokenizer.encode(sentence)
        ids.append(encoding.ids)
        h = bert(tensors, np.array(encoding.ids), cfg)
        hidden.append(h)
        mean = h.mean(0)
        pooled.append(mean / np.linalg.norm(mean))
        w, b = tensors["pooler.dense.weight"], tensors["pooler.dense.bias"]
        pooler.append(np.tanh(w @ h[0] + b))
    with open(os.path.join(out_dir, "minilm-reference.bin"), "wb") as f:
        for h in hidden:
            f.write(h.astype("<f4").tobytes())
        f.write(np.stack(pooled).astype("<f4").tobytes())
        f.write(np.stack(pooler).astype("<f4").tobytes())
    with open(os.path.join(out_dir, "minilm-reference.json"), "w") as f:
        json.dump({"sentences": SENTENCES, "ids": ids, "hidden": cfg["hidden_size"]}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(SENTENCES)} sentences ({[len(i) for i in ids]} tokens) to {out_dir}")


if __name__ == "__main__":
    main()
