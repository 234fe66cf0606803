"""Trainer for the multimodal MoE model: ``python -m model.train [flags]``.

    python -m model.train                         # digits VQA on CPU, defaults (make demo)
    python -m model.train --config cfg.yaml --steps 500 --precision bf16
    python -m model.train --out runs/a --resume auto
    torchrun --nproc_per_node=2 -m model.train --grad-compress int8

Every flag may also come from a YAML file (``--config``; keys are the flag names with
underscores); flags given on the command line win. See model/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.data import (PairSampler, Tokenizer, balanced_pairs, collate, load_digits_vqa,
                        load_folder_vqa, question_kind, split_by_image)
from model.modeling import ModelConfig, MultimodalMoE

CKPT_PATTERN = "step_*.pt"


# ---------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file of flag values (flags on the command line win)")
    a("--data", default="digits", help="'digits' or a folder with annotations.jsonl")
    a("--val-fraction", type=float, default=0.2)
    a("--balance-questions", action=argparse.BooleanOptionalAction, default=True,
      help="train on every question kind equally often (validation asks every question)")
    a("--steps", type=int, default=3000, help="VQA optimizer steps")
    a("--align-steps", type=int, default=0, help="CLIP-style image-text alignment steps first")
    a("--batch-size", type=int, default=64, help="global batch (split across ranks)")
    a("--accum-steps", type=int, default=1,
      help="gradient accumulation micro-batches per step (must divide the per-rank batch)")
    a("--lr", type=float, default=3e-3)
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    a("--warmup-steps", type=int, default=50)
    a("--weight-decay", type=float, default=0.01)
    a("--optimizer", choices=["adamw", "lion"], default="adamw")
    a("--clip-grad", type=float, default=1.0, help="max grad norm, 0 = off")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="bf16: autocast; fp16: autocast + GradScaler (CUDA only); auto: bf16 on CUDA "
           "(the CUDA attention kernels take fp16/bf16), fp32 on CPU")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--out", default="runs/digits", help="output folder")
    a("--seed", type=int, default=0)
    a("--freeze-image-until", type=int, default=0,
      help="gradual unfreezing: the image tower gets no updates before this VQA step")
    a("--grad-compress", choices=["none", "int8", "int4", "topk"], default="none",
      help="DDP gradient compression hook (under torchrun)")
    a("--no-kernels", action="store_true", help="run the pure-PyTorch reference path")
    a("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
      help="torch.compile the training forward (dynamic shapes, one graph per MoE "
           "mode): --compile for Inductor, --compile aot_eager to check tracing only")
    a("--eval-every", type=int, default=500)
    a("--val-limit", type=int, default=0, help="evaluate on this many validation pairs (0 = all)")
    a("--log-every", type=int, default=10)
    a("--ckpt-every", type=int, default=500)
    a("--keep-ckpts", type=int, default=3)
    a("--resume", default=None, help="'auto' (latest in OUT/checkpoints) or a checkpoint path")
    a("--stop-after", type=int, default=None, help="stop (as if interrupted) after this step")
    a("--no-progress", action="store_true", help="no tqdm bar")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    # model size
    a("--dim", type=int, default=64)
    a("--layers", type=int, default=2)
    a("--image-layers", type=int, default=1)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=2)
    a("--experts", type=int, default=4)
    a("--top-k", type=int, default=2)
    a("--expert-hidden", type=int, default=64)
    a("--capacity-factor", type=float, default=None, help="None = dropless MoE")
    a("--bias-update-rate", type=float, default=0.0)
    a("--fp8", action="store_true", help="FP8 block-scaled projections and experts (e4m3, DeepSeek-V3 scaling)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.config:
        import yaml

        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in p._actions}
        bad = sorted(set(k.replace("-", "_") for k in cfg) - known)
        if bad:
            p.error(f"{args.config}: unknown keys {bad}")
        p.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
        args = p.parse_args(argv)
        for action in p._actions:  # argparse checks choices on the command line only
            v = getattr(args, action.dest, None)
            if action.choices is not None and v not in action.choices:
                p.error(f"{args.config}: {action.dest}: {v!r} is not one of {list(action.choices)}")
    for name in ("steps", "batch_size", "accum_steps", "log_every", "eval_every", "ckpt_every",
                 "keep_ckpts"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------------------
# optimization
# ---------------------------------------------------------------------------

class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): update = sign(b1*m + (1-b1)*g); m <- b2*m + (1-b2)*g."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                m = st["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def lr_at(step: int, total: int, args) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    c = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * c)


def make_optimizer(model, args):
    """Weight decay on the matrices of the linear maps (projections, experts, the
    router, the patch embedding), none on embeddings, positions, norms and biases.
    (A name filter on "emb" exempted the patch embedding's linear map and decayed
    the position tables.)"""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    tables |= {id(p) for n, p in model.named_parameters() if n.endswith("_pos")}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if args.optimizer == "lion":
        return Lion(groups, lr=args.lr)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def save_checkpoint(path: str, state: Dict) -> None:
    """Atomic and durable: write a temporary file in the same folder, flush it to
    disk, rename it over, then flush the folder's entry. Without the fsyncs a power
    loss after the rename can leave an empty or partial file under the final name
    (the rename may reach the disk before the data), which ``--resume auto`` picks."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        # a failed write leaves no partial file (no checkpoint pattern would prune it)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename into it) where the OS allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; its renames are flushed with the file
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(folder: str) -> List[str]:
    return sorted(glob.glob(os.path.join(folder, CKPT_PATTERN)))


def set_aside_later_checkpoints(folder: str, step: int) -> None:
    """Resuming from step ``step``: checkpoints of later steps in ``folder`` belong to
    the run being replaced. Left in place, pruning would keep them over the resumed
    run's own (it keeps the highest steps) and ``--resume auto`` would pick them;
    they are moved to ``folder/abandoned-<time>/``, not deleted."""
    later = [p for p in list_checkpoints(folder)
             if int(os.path.basename(p)[len("step_"):-len(".pt")]) > step]
    if not later:
        return
    dest = os.path.join(folder, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    os.makedirs(dest, exist_ok=True)
    for p in later:
        os.replace(p, os.path.join(dest, os.path.basename(p)))
    print(f"note: resuming from step {step}: moved {len(later)} later checkpoint(s) of the replaced "
          f"run to {dest}", file=sys.stderr)


def prune_checkpoints(folder: str, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep]:
        os.remove(old)


def load_checkpoint(spec: str, out: str) -> Dict:
    """'auto' = the latest in OUT/checkpoints. A missing or unreadable checkpoint is an
    error, never a silent fresh start."""
    if spec == "auto":
        found = list_checkpoints(os.path.join(out, "checkpoints"))
        if not found:
            raise SystemExit(f"--resume auto: no checkpoint in {os.path.join(out, 'checkpoints')}")
        spec = found[-1]
    if not os.path.isfile(spec):
        raise SystemExit(f"--resume: checkpoint {spec} does not exist")
    try:
        ck = torch.load(spec, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupt file
        raise SystemExit(f"--resume: checkpoint {spec} is corrupt or unreadable ({type(e).__name__}: {e})")
    need = {"model", "optimizer", "step", "model_config", "tokenizer", "rng"}
    if not isinstance(ck, dict) or not need <= set(ck):
        raise SystemExit(f"--resume: {spec} is not a model.train checkpoint "
                         f"(missing {sorted(need - set(ck) if isinstance(ck, dict) else need)})")
    ck["path"] = spec
    return ck


def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tok: Tokenizer, data, device, batch_size: int = 512, autocast=None,
             limit: int = 0) -> Dict:
    """Exact-match answer accuracy with teacher forcing. Equal to greedy decoding's exact
    match: while every earlier answer token is right, the inputs are the same.
    ``limit``: an evenly spaced subset of that many pairs (0 = all)."""
    model.eval()
    pairs = data.pairs()
    if limit and limit < len(pairs):
        pairs = pairs[::len(pairs) // limit][:limit]
    right, kinds = 0, {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate(tok, data, chunk).items()}
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(b["images"], b["input_ids"])
        m = b["targets"] != -100
        ok = ((logits.argmax(-1) == b["targets"]) | ~m).all(1).cpu()
        right += int(ok.sum())
        for (_, q, _), o in zip(chunk, ok.tolist()):
            kind = question_kind(q)
            r, n = kinds.get(kind, (0, 0))
            kinds[kind] = (r + o, n + 1)
    model.train()
    return {"val_accuracy": right / max(1, len(pairs)),
            "by_question": {k: r / n for k, (r, n) in sorted(kinds.items())}}


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def _setup_distributed(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    rank = int(os.environ["RANK"])
    use_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world, dist.group.WORLD


def _resolve_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(arg)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {arg}: CUDA is not available on this machine")
        if d.index is None and dist.is_initialized():
            d = torch.device("cuda", torch.cuda.current_device())
    return d


def _comm_hook(ddp, args, group):
    from deepseek_kernels import distributed as dkd

    if args.grad_compress in ("int8", "int4"):
        state = dkd.CompressionState(process_group=group, bits=8 if args.grad_compress == "int8" else 4,
                                     start_iter=2)
        ddp.register_comm_hook(state, dkd.compressed_allreduce_hook)
        return state
    if args.grad_compress == "topk":
        state = dkd.TopKState(process_group=group, fraction=0.05)
        ddp.register_comm_hook(state, dkd.topk_sparsify_hook)
        return state
    return None


def _captions(data, tok):
    """Alignment captions: 'a handwritten digit seven' (digits) or the first answer."""
    from model.data import DIGIT_WORDS

    if data.labels is not None:
        return [tok.encode(f"a handwritten digit {DIGIT_WORDS[int(y)]}") for y in data.labels]
    return [tok.encode(qa[0][1]) for qa in data.qa]


def train(args: argparse.Namespace) -> Dict:
    rank, world, group = _setup_distributed(args.device)
    device = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.precision == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs CUDA (GradScaler); use bf16 on CPU")
    main_rank = rank == 0
    os.makedirs(os.path.join(args.out, "checkpoints"), exist_ok=True)

    # data
    data = load_digits_vqa() if args.data == "digits" else load_folder_vqa(args.data)
    train_data, val_data = split_by_image(data, args.val_fraction, seed=1234)

    resume = load_checkpoint(args.resume, args.out) if args.resume else None
    if resume:
        tok = Tokenizer.from_state_dict(resume["tokenizer"])
        mcfg = ModelConfig.from_dict(resume["model_config"])
    else:
        texts = [q + " " + a for qa in data.qa for q, a in qa]
        texts += ["a handwritten digit"]
        tok = Tokenizer.build(texts)
        mcfg = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, num_layers=args.layers,
                           image_layers=args.image_layers, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, num_experts=args.experts, top_k=args.top_k,
                           expert_hidden=args.expert_hidden, capacity_factor=args.capacity_factor,
                           bias_update_rate=args.bias_update_rate, fp8=args.fp8,
                           image_size=data.images.shape[-1], channels=data.images.shape[1])

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = MultimodalMoE(mcfg).to(device)
    model.set_use_kernels(not args.no_kernels)
    opt = make_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    total = args.align_steps + args.steps
    step, history = 0, []
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step, history = resume["step"], resume.get("history", [])
        set_rng_state(resume["rng"])
        if main_rank:
            set_aside_later_checkpoints(os.path.join(args.out, "checkpoints"), step)

    ddp_model, comm_state = model, None
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
        comm_state = _comm_hook(ddp_model, args, group)
        saved = resume.get("comm_state") if resume else None
        if comm_state is not None and saved:
            # one state per rank (the residuals are each rank's own error); a single
            # dict is an older checkpoint's rank-0 state
            if isinstance(saved, list) and len(saved) != world:
                print(f"note: the checkpoint's compression state is from {len(saved)} ranks, "
                      f"this run has {world}: the hook starts afresh", file=sys.stderr)
            else:
                comm_state.load_state_dict(saved[rank] if isinstance(saved, list) else saved)

    # The training forward, compiled on request. Dynamic shapes from the start: the
    # text length changes from batch to batch, and our ops' fakes take symbolic sizes
    # (tests/test_dynamic_shapes.py). The MoE layers' aux_loss attributes, set in the
    # forward, are replayed by Dynamo, so answer_loss reads them as in eager mode.
    forward = ddp_model
    if args.compile:
        forward = torch.compile(ddp_model, backend=args.compile, dynamic=True)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else None

    pairs = balanced_pairs(train_data) if args.balance_questions else train_data.pairs()
    sampler = PairSampler(pairs, args.batch_size, args.seed, rank, world)
    captions = _captions(train_data, tok)
    n_img_tokens = (mcfg.image_size // mcfg.patch_size) ** 2
    micro = args.batch_size // world // args.accum_steps
    if micro * world * args.accum_steps != args.batch_size:  # a remainder would go untrained
        raise SystemExit(f"--batch-size {args.batch_size} does not split into {world} ranks x "
                         f"{args.accum_steps} accumulation steps of equal micro-batches")

    writer = None
    if main_rank:
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run logs again the steps after its checkpoint
            writer = SummaryWriter(os.path.join(args.out, "tb"),
                                   purge_step=step + 1 if resume else None)
        except Exception as e:  # tensorboard not installed: JSONL still has everything
            print(f"note: TensorBoard logging off ({type(e).__name__}: {e})", file=sys.stderr)
    log_path = os.path.join(args.out, "metrics.jsonl")
    if main_rank and not resume and os.path.exists(log_path):
        os.remove(log_path)
    if main_rank and resume and os.path.exists(log_path):
        # drop what the interrupted run logged after the checkpoint (it is logged
        # again), and a last line a crash cut short
        with open(log_path) as f:
            kept = [l for l in f if l.endswith("\n") and json.loads(l)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)

    bar = None
    if main_rank and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)

    image_params = {id(p) for p in model.parameter_groups()["image"]}
    model.train()
    t_start, tokens_seen, t_window, tok_window = time.perf_counter(), 0, time.perf_counter(), 0
    stop_at = total if args.stop_after is None else min(total, args.stop_after)
    while step < stop_at:
        aligning = step < args.align_steps
        lr = lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch_pairs = sampler.batch(step)
        opt.zero_grad(set_to_none=True)
        stats_sum = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "answer_acc": 0.0}
        for a in range(args.accum_steps):
            chunk = batch_pairs[a * micro:(a + 1) * micro]
            last = a == args.accum_steps - 1
            sync = ddp_model.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
            with sync, (autocast() if autocast else contextlib.nullcontext()):
                if aligning:
                    idx = [i for i, _, _ in chunk]
                    caps = [captions[i] for i in idx]
                    width = max(map(len, caps))
                    cap_ids = torch.tensor([c + [0] * (width - len(c)) for c in caps], device=device)
                    imgs = train_data.images[idx].to(device)
                    # through the DDP wrapper too: bypassing it left the gradients
                    # unsynchronized and broke DDP's next (VQA) backward
                    loss = ddp_model(imgs, cap_ids, contrastive=True)
                    out = {"loss": loss, "ce": loss.detach(), "aux": torch.zeros(()),
                           "answer_acc": torch.zeros(())}
                else:
                    b = {k: v.to(device) for k, v in collate(tok, train_data, chunk).items()}
                    # through the DDP wrapper, so its reducer sees the graph
                    out = model.answer_loss(forward(b["images"], b["input_ids"]), b["targets"])
                    tokens_seen += b["input_ids"].numel() + len(chunk) * n_img_tokens
                    tok_window += b["input_ids"].numel() + len(chunk) * n_img_tokens
            loss = out["loss"] / args.accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            for k in stats_sum:
                stats_sum[k] += float(out[k].detach()) / args.accum_steps
        if not aligning and step - args.align_steps < args.freeze_image_until:
            for p in model.parameters():
                if id(p) in image_params:
                    p.grad = None
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None],
            args.clip_grad if args.clip_grad > 0 else float("inf"))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        step += 1

        if world > 1:  # every logged term is the global mean (aux was rank 0's alone)
            keys = list(stats_sum)
            t = torch.tensor([stats_sum[k] for k in keys], device=device)
            dist.all_reduce(t)
            stats_sum.update(zip(keys, (t / world).tolist()))
        rec = {"step": step, "stage": "align" if aligning else "vqa", "lr": lr,
               "grad_norm": float(gnorm), **stats_sum}
        history.append({"step": step, "loss": rec["loss"]})
        if main_rank and (step % args.log_every == 0 or step == total):
            now = time.perf_counter()
            rec["tokens_per_s"] = tok_window * world / max(1e-9, now - t_window)
            t_window, tok_window = now, 0
            _log(log_path, writer, rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
        if main_rank and not aligning and step % args.eval_every == 0 and step < total:
            ev = evaluate(model, tok, val_data, device, autocast=autocast, limit=args.val_limit)
            history[-1]["val_accuracy"] = ev["val_accuracy"]
            _log(log_path, writer, {"step": step, "val_accuracy": ev["val_accuracy"]})
            if bar is not None:
                bar.write(f"step {step}: val_accuracy {ev['val_accuracy']:.4f}")
        if step % args.ckpt_every == 0 or step == stop_at:
            comm = None
            if comm_state is not None:  # every rank's residuals, not only rank 0's
                comm = [None] * world if main_rank else None
                dist.gather_object(comm_state.state_dict(), comm, dst=0)
            if main_rank:
                ckdir = os.path.join(args.out, "checkpoints")
                save_checkpoint(os.path.join(ckdir, f"step_{step:07d}.pt"), {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None, "step": step,
                    "model_config": mcfg.to_dict(), "tokenizer": tok.state_dict(),
                    "rng": rng_state(), "history": history, "args": vars(args),
                    "comm_state": comm})
                prune_checkpoints(ckdir, args.keep_ckpts)
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start

    summary = {"steps_done": step, "finished": step >= total, "losses": [h["loss"] for h in history]}
    if main_rank and step >= total:
        ev = evaluate(model, tok, val_data, device, autocast=autocast, limit=args.val_limit)
        history[-1]["val_accuracy"] = ev["val_accuracy"]
        summary.update({
            "val_accuracy": ev["val_accuracy"], "val_accuracy_by_question": ev["by_question"],
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": tokens_seen * world / max(1e-9, wall), "wall_s": wall,
            "device": str(device), "world_size": world, "kernels": not args.no_kernels,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "settings": vars(args)})
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=1)
        _plot(history, os.path.join(args.out, "training.png"))
        print(f"val_accuracy {ev['val_accuracy']:.4f}  tokens/s {summary['tokens_per_s']:,.0f}  "
              f"wall {wall:.1f}s  -> {args.out}/summary.json")
    if writer is not None:
        writer.close()
    return summary


def _log(path: str, writer, rec: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(k, v, rec["step"])


def _plot(history: List[Dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing, no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([h["step"] for h in history], [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    acc = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if acc:
        ax[1].plot(*zip(*acc), marker="o")
    ax[1].set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="validation answer accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
