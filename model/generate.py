"""Answer questions about images with a trained model: ``python -m model.generate``.

    python -m model.generate --out runs/digits --images 0,1,2 --question "what digit is this ?"
    python -m model.generate --out runs/digits --image-file my7.png --question "is it odd ?"
    python -m model.generate --out runs/digits --eval            # fp32 vs bf16 vs INT8 accuracy

Requests are answered with dynamic batching: sorted by prompt length into buckets of
equal length (no padding at all), each bucket one batch of at most --max-batch.
``--int8`` swaps every deepseek_kernels.nn.Linear for an INT8 weight-and-activation
quantized one (``int8_gemm``, per-row scales); ``--eval`` reports the validation
accuracy of fp32, bf16 and INT8 side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from deepseek_kernels import nn as dnn
from model.data import Tokenizer, load_digits_vqa, load_folder_vqa, split_by_image
from model.modeling import ModelConfig, MultimodalMoE
from model.train import load_checkpoint


def load_model(spec: str, out: str, device: torch.device) -> Tuple[MultimodalMoE, Tokenizer, Dict]:
    ck = load_checkpoint(spec, out)
    model = MultimodalMoE(ModelConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), Tokenizer.from_state_dict(ck["tokenizer"]), ck


def quantize_int8_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every deepseek_kernels.nn.Linear (and FP8Linear: an --fp8 model's
    projections, left FP8 before) with nn.Int8Linear (in place)."""
    for name, child in list(model.named_children()):
        if isinstance(child, (dnn.Linear, dnn.FP8Linear)):
            setattr(model, name, dnn.Int8Linear.from_linear(child))
        else:
            quantize_int8_(child)
    return model


def answer_requests(model: MultimodalMoE, tok: Tokenizer, requests: Sequence[Tuple[Tensor, str]],
                    device: torch.device, max_batch: int = 256, autocast=None) -> List[str]:
    """Dynamic batching: same-length prompts share a batch; answers come back in the
    order of ``requests``."""
    prompts = [tok.prompt(q) for _, q in requests]
    order = sorted(range(len(requests)), key=lambda i: (len(prompts[i]), i))
    answers: List[str] = [""] * len(requests)
    i = 0
    while i < len(order):
        n = len(prompts[order[i]])
        j = i
        while j < len(order) and j - i < max_batch and len(prompts[order[j]]) == n:
            j += 1
        idx = order[i:j]
        images = torch.stack([requests[r][0] for r in idx]).to(device)
        ids = torch.tensor([prompts[r] for r in idx], device=device)
        with autocast() if autocast else contextlib.nullcontext():
            outs = model.generate(images, ids)
        for r, o in zip(idx, outs):
            answers[r] = tok.decode(o)
        i = j
    return answers


def accuracy(model, tok, data, device, autocast=None, limit: int = 0, max_batch: int = 256) -> float:
    pairs = data.pairs()
    if limit:
        pairs = pairs[:limit]
    reqs = [(data.images[i], q) for i, q, _ in pairs]
    got = answer_requests(model, tok, reqs, device, max_batch, autocast=autocast)
    # the answer as the tokenizer reads it ("Yes" -> "yes"), as the trainer scores it
    return sum(g == tok.decode(tok.encode(a)) for g, (_, _, a) in zip(got, pairs)) / max(1, len(pairs))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digits", help="training output folder")
    p.add_argument("--checkpoint", default="auto", help="'auto' (latest in OUT) or a path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", default="0,1,2,3", help="indices into the validation images")
    p.add_argument("--image-file", action="append", default=[], help="an image file (any size)")
    p.add_argument("--question", action="append", default=[])
    p.add_argument("--int8", action="store_true", help="INT8 weight+activation quantized Linears")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--eval", action="store_true", help="validation accuracy: fp32, bf16, int8")
    p.add_argument("--eval-limit", type=int, default=0, help="first N validation pairs only")
    p.add_argument("--max-batch", type=int, default=256)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model, tok, ck = load_model(args.checkpoint, args.out, device)
    targs = ck.get("args", {})
    data_spec = targs.get("data", "digits")
    data = load_digits_vqa() if data_spec == "digits" else load_folder_vqa(data_spec)
    _, val = split_by_image(data, targs.get("val_fraction", 0.2), seed=1234)
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    if args.eval:
        res = {"checkpoint": ck["path"], "pairs": args.eval_limit or len(val.pairs())}
        kw = dict(limit=args.eval_limit, max_batch=args.max_batch)
        res["fp32"] = accuracy(model, tok, val, device, **kw)
        res["bf16"] = accuracy(model, tok, val, device, autocast=bf16, **kw)
        res["int8"] = accuracy(quantize_int8_(model), tok, val, device, **kw)
        for k in ("fp32", "bf16", "int8"):
            print(f"{k:5s} validation answer accuracy {res[k]:.4f}")
        with open(os.path.join(args.out, "generate_eval.json"), "w") as f:
            json.dump(res, f, indent=1)
        return

    if args.int8:
        quantize_int8_(model)
    questions = args.question or ["what digit is this ?", "is it even ?"]
    if args.image_file:
        from model.data import read_grey_image

        size = model.cfg.image_size
        imgs = [(f, read_grey_image(f, size)) for f in args.image_file]
    else:
        imgs = [(f"val[{i}]", val.images[int(i)]) for i in args.images.split(",")]
    reqs = [(img, q) for _, img in imgs for q in questions]
    answers = answer_requests(model, tok, reqs, device, args.max_batch,
                              autocast=bf16 if args.precision == "bf16" else None)
    k = 0
    for name, _ in imgs:
        for q in questions:
            print(f"{name}: {q} -> {answers[k]}")
            k += 1


if __name__ == "__main__":
    main()
