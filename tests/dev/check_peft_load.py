#!/usr/bin/env python3
"""Check that PEFT adapter directories written by amalgam load in Hugging Face PEFT.

Developer tool, NOT run by CI (it needs torch + transformers + peft, e.g. the
mergekit venv at /work/venv-mergekit, which has peft 0.21).

Usage:
    AMALGAM_PEFT_KEEP_DIR=/tmp/amalgam-peft cargo test -p amalgam-io --test peft
    /work/venv-mergekit/bin/python tests/dev/check_peft_load.py /tmp/amalgam-peft/lora /tmp/amalgam-peft/ia3 \
        [--base tests/fixtures/mergekit/models/base]

For each ADAPTER_DIR (adapter_config.json + adapter_model.safetensors), on the
base model (default: the tiny Llama fixture):
  1. PeftModel.from_pretrained(base, ADAPTER_DIR) loads it, and every adapter
     parameter of the loaded model (lora_A / lora_B / ia3_l) equals the file's
     tensor bit for bit, with no file tensor left unused;
  2. for LoRA, each layer's scaling equals alpha / r (alpha / sqrt(r) with
     use_rslora), r and alpha taken from rank_pattern / alpha_pattern by PEFT's
     documented rule, computed here independently from the config JSON;
  3. merge_and_unload() gives W + scaling * B @ A (LoRA) or W * l ((IA)^3,
     rows for output vectors, columns for feedforward ones), checked against a
     float64 computation from the files;
  4. a forward pass gives finite logits.
Prints a short report per adapter and "OK" when every check passes; exits
non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

PREFIX = "base_model.model."


def pattern_value(patterns: dict, module: str, default):
    # PEFT: the first key (file order; PEFT saves sorted) with re.match(rf"(.*\.)?({key})$", module).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def is_lora_layer(mod) -> bool:
    scaling = getattr(mod, "scaling", None)
    return isinstance(scaling, dict) and "default" in scaling


def check(adapter_dir: str, base_dir: str, tokens: list[int]) -> list[str]:
    from peft import PeftModel

    failures: list[str] = []
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    files = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    kind = cfg["peft_type"]

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_weights = {n: p.detach().clone().double() for n, p in base.named_parameters()}
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()

    # 1. Every adapter parameter equals its file tensor.
    used = set()
    n_adapter = 0
    for name, p in model.named_parameters():
        if ".lora_" not in name and ".ia3_l" not in name:
            continue
        n_adapter += 1
        file_key = name.replace(".default", "")
        if file_key not in files:
            failures.append(f"{name}: no tensor {file_key} in the file (PEFT kept its initial value)")
            continue
        used.add(file_key)
        t = files[file_key]
        if tuple(t.shape) != tuple(p.shape) or not torch.equal(p.detach().cpu(), t.to(p.dtype)):
            failures.append(f"{name}: differs from the file's {file_key} {tuple(t.shape)}")
    unused = sorted(set(files) - used)
    if unused:
        failures.append(f"file tensors PEFT did not load: {unused[:5]}")
    print(f"{adapter_dir}: {kind}, {len(files)} file tensors, {n_adapter} adapter parameters loaded")

    # 2. LoRA scaling per layer.
    modules = sorted({k[len(PREFIX):].rsplit(".", 2 if kind == "LORA" else 1)[0] for k in files})
    if kind == "LORA":
        for name, mod in model.named_modules():
            if not is_lora_layer(mod):
                continue
            module = name[len("base_model.model."):]
            r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            want = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            got = mod.scaling["default"]
            if mod.r["default"] != r or abs(got - want) > 1e-12 * abs(want):
                failures.append(f"{module}: PEFT has r={mod.r['default']} scaling={got}, expected r={r} scaling={want}")
        scalings = {}
        for name, mod in model.named_modules():
            if is_lora_layer(mod):
                scalings[name[len("base_model.model."):]] = mod.scaling["default"]
        print("  scalings: " + ", ".join(f"{m.split('model.layers.')[-1]}={s:.6g}" for m, s in sorted(scalings.items())))

    # 4. (before merging) forward pass.
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits
    if not torch.isfinite(logits).all():
        failures.append("forward: non-finite logits")

    # 3. merge_and_unload against float64 from the files.
    merged = model.merge_and_unload()
    merged_weights = dict(merged.named_parameters())
    max_err = 0.0
    for module in modules:
        wname = f"{module}.weight"
        w0 = base_weights[wname]
        if kind == "LORA":
            a = files[f"{PREFIX}{module}.lora_A.weight"].double()
            b = files[f"{PREFIX}{module}.lora_B.weight"].double()
            s = scalings[module]
            want = w0 + s * (b @ a)
        else:
            l = files[f"{PREFIX}{module}.ia3_l"].double()
            want = w0 * l  # [out, 1] scales rows, [1, in] scales columns
        got = merged_weights[wname].detach().double()
        # f32 vs float64: judge the error against the weight's scale (entries near zero cancel).
        err = ((got - want).abs().max() / want.abs().max()).item()
        max_err = max(max_err, err)
        if err > 1e-5:
            failures.append(f"{wname}: merged weight differs from the float64 reference (max err {err:.3g} of max |W|)")
    print(f"  merge_and_unload: {len(modules)} weights, max |err| / max |W| vs float64 {max_err:.3g}; "
          f"forward logits {tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dirs", nargs="+")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--base", default=os.path.join(here, "..", "fixtures", "mergekit", "models", "base"))
    ap.add_argument("--tokens", default="1,5,7,3,11,2")
    args = ap.parse_args()
    tokens = [int(x) for x in args.tokens.split(",")]
    failures = []
    for d in args.adapter_dirs:
        failures += [f"{d}: {f}" for f in check(d, args.base, tokens)]
    if failures:
        print(f"FAIL ({len(failures)}):")
        for f in failures:
            print(f"  {f}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
