#!/usr/bin/env python3
"""Check that a merged model directory loads and runs in Hugging Face transformers.

Developer tool, NOT run by CI (it needs torch + transformers, e.g. the
mergekit venv: ``python3 -m venv /work/venv-mergekit &&
/work/venv-mergekit/bin/pip install mergekit==0.1.5``).

Usage:
    /work/venv-mergekit/bin/python tests/dev/check_transformers_load.py OUTPUT_DIR [--tokens 1,5,7,3]

What it checks, for OUTPUT_DIR (a Hugging Face model directory with
config.json and *.safetensors, e.g. an amalgam or mergekit output):
  1. AutoModelForCausalLM.from_pretrained(OUTPUT_DIR, dtype="auto") loads it
     (transformers must not report missing or unexpected weights);
  2. a forward pass on a few token ids gives finite logits of shape
     [1, n_tokens, vocab_size];
  3. every parameter of the loaded model equals, bit for bit, the tensor of
     the same name in the safetensors files (tied weights are reported).
Prints a short report and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM


def load_safetensors(path: str) -> dict:
    tensors = {}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise SystemExit(f"no *.safetensors in {path}")
    for f in files:
        for name, t in load_file(f).items():
            if name in tensors:
                raise SystemExit(f"tensor {name} appears in more than one file")
            tensors[name] = t
    return tensors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir")
    ap.add_argument("--tokens", default="1,5,7,3,11,2", help="comma-separated token ids")
    args = ap.parse_args()

    failures = []
    cfg = AutoConfig.from_pretrained(args.output_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        args.output_dir, dtype="auto", output_loading_info=True
    )
    model.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        vals = info.get(key) or []
        if vals:
            failures.append(f"loading: {key}: {list(vals)[:5]}")

    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    dtypes = sorted({str(p.dtype) for p in params.values()})
    print(f"loaded {type(model).__name__} from {args.output_dir}: "
          f"{cfg.num_hidden_layers} layers, {len(params)} tensors, {n_params} params, dtype {dtypes}")

    ids = [int(x) for x in args.tokens.split(",")]
    if max(ids) >= cfg.vocab_size:
        raise SystemExit(f"token id {max(ids)} >= vocab_size {cfg.vocab_size}")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    want = (1, len(ids), cfg.vocab_size)
    if tuple(logits.shape) != want:
        failures.append(f"forward: logits shape {tuple(logits.shape)}, want {want}")
    if not torch.isfinite(logits).all():
        failures.append("forward: non-finite logits")
    print(f"forward on {ids}: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}, "
          f"argmax {logits[0].argmax(-1).tolist()}")

    files = load_safetensors(args.output_dir)
    compared = 0
    for name, p in params.items():
        if name not in files:
            failures.append(f"param {name}: not in the safetensors files")
            continue
        t = files[name]
        if t.shape != p.shape:
            failures.append(f"param {name}: shape {tuple(p.shape)} vs file {tuple(t.shape)}")
        elif t.dtype != p.dtype:
            failures.append(f"param {name}: dtype {p.dtype} vs file {t.dtype}")
        elif not torch.equal(p.detach().cpu(), t):
            diff = (p.detach().cpu().double() - t.double()).abs().max().item()
            failures.append(f"param {name}: values differ (max abs diff {diff:.3g})")
        else:
            compared += 1
    unused = sorted(set(files) - set(params))
    tied = [n for n in unused if n in dict(model.named_parameters(remove_duplicate=False))]
    extra = [n for n in unused if n not in tied]
    if extra:
        failures.append(f"file tensors the model does not use: {extra[:5]}")
    print(f"compared {compared}/{len(params)} parameters bit-exactly with {len(files)} file tensors"
          + (f" ({len(tied)} tied)" if tied else ""))

    if failures:
        print(f"FAIL ({len(failures)}):")
        for f in failures:
            print("  " + f)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
