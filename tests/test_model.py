"""The multimodal MoE model and trainer (model/): kernels path vs reference path,
resume, DDP with compressed gradients, checkpoints, inference with dynamic batching
and INT8. Small models and few steps, so the whole file runs in a couple of minutes
on 2 cores."""

import json
import math
import os
import stat
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import DEVICES
from model import generate as gen
from model.data import (PairSampler, Tokenizer, collate, digit_questions, encode_example,
                        load_digits_vqa, split_by_image, VQAData)
from model.modeling import ModelConfig, MultimodalMoE
from model.train import load_checkpoint, parse_args, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--experts", "4",
         "--top-k", "2", "--expert-hidden", "32", "--batch-size", "32", "--warmup-steps", "5",
         "--no-progress", "--eval-every", "1000", "--val-limit", "256", "--log-every", "1000", "--threads", "2"]


def run(tmp, name, *extra, steps=50):
    out = os.path.join(str(tmp), name)
    return train(parse_args(SMALL + ["--steps", str(steps), "--out", out, "--ckpt-every", "1000",
                                     *map(str, extra)])), out


# --------------------------------------------------------------------- data


def test_questions_and_tokenizer_roundtrip():
    qa = dict(digit_questions(7))
    assert qa["what digit is this ?"] == "seven"
    assert qa["is it even ?"] == "no" and qa["is it a prime ?"] == "yes"
    assert qa["is it larger than 6 ?"] == "yes" and qa["is it larger than 7 ?"] == "no"
    tok = Tokenizer.build(["is it larger than 4 ?", "yes no seven"])
    ids, tgt = encode_example(tok, "is it larger than 4 ?", "yes")
    assert tok.decode(ids) == "is it larger than 4 ? yes"
    # loss only on the answer word and the final <eos>
    assert [t for t in tgt if t != -100] == [tok.stoi["yes"], 3]
    assert Tokenizer.from_state_dict(tok.state_dict()).itos == tok.itos


def test_split_is_by_image_and_sampler_deterministic():
    d = load_digits_vqa()
    assert len(d) == 1797
    # tag every image with its index: the two sides must be disjoint and cover all
    tagged = VQAData(torch.arange(100.0).view(100, 1, 1, 1), [[("q", str(i))] for i in range(100)])
    tr, va = split_by_image(tagged, 0.2, seed=1234)
    a, b = set(tr.images.flatten().tolist()), set(va.images.flatten().tolist())
    assert len(va) == 20 and not a & b and len(a | b) == 100
    assert [qa[0][1] for qa in va.qa] == [str(int(x)) for x in va.images.flatten()]
    tr, va = split_by_image(d, 0.2, seed=1234)
    s1, s2 = PairSampler(tr.pairs(), 8, 3), PairSampler(tr.pairs(), 8, 3)
    assert s1.batch(5) == s2.batch(5) and s1.batch(10_000) == s2.batch(10_000)
    # two ranks split each global batch between them
    r0, r1 = PairSampler(tr.pairs(), 8, 3, 0, 2), PairSampler(tr.pairs(), 8, 3, 1, 2)
    assert r0.batch(7) + r1.batch(7) == s1.batch(7)


# ------------------------------------------------------- kernels vs reference


def test_kernels_match_reference_fp32(tmp_path):
    ker, _ = run(tmp_path, "k")
    ref, _ = run(tmp_path, "r", "--no-kernels")
    lk, lr = torch.tensor(ker["losses"]), torch.tensor(ref["losses"])
    assert len(lk) == 50 and torch.isfinite(lk).all()
    assert lk[-1] < 0.7 * lk[0], "the model did not learn"
    rel = ((lk - lr).abs() / lr.abs()).max().item()
    assert rel <= 0.01, f"kernels vs reference loss differs by {rel:.2%} at some step (limit 1%)"


def test_kernels_match_reference_bf16(tmp_path):
    """Derived tolerance: the kernels path under bf16 autocast may drift from the fp32
    reference run at most 2x (+ a 1% floor) as much as the reference path under bf16."""
    base, _ = run(tmp_path, "f32", "--no-kernels", steps=30)
    ker, _ = run(tmp_path, "kb", "--precision", "bf16", steps=30)
    ref, _ = run(tmp_path, "rb", "--no-kernels", "--precision", "bf16", steps=30)
    b, k, r = (torch.tensor(x["losses"]) for x in (base, ker, ref))
    dk = ((k - b).abs() / b).max().item()
    dr = ((r - b).abs() / b).max().item()
    assert torch.isfinite(k).all()
    assert dk <= 2 * dr + 0.01, f"bf16 kernels drift {dk:.3%} vs reference bf16 drift {dr:.3%}"


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_compiled_training_matches_eager(tmp_path, capacity_factor):
    """--compile aot_eager: the training forward is one graph with dynamic shapes (the
    text length changes between batches; no recompile, no graph break, dropless or
    capacity MoE) and the losses are eager's, bit for bit (aot_eager runs the traced
    ops as they are; Inductor would fuse the torch ops between ours)."""
    from torch._dynamo.utils import counters

    cf = [] if capacity_factor is None else ["--capacity-factor", str(capacity_factor)]
    eager, _ = run(tmp_path, "eager", *cf, steps=12)
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = run(tmp_path, "compiled", "--compile", "aot_eager", *cf, steps=12)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], (
        dict(counters["stats"]), dict(counters["graph_break"]))
    assert compiled["losses"] == eager["losses"]


# ------------------------------------------------------------------ resume


def test_resume_is_exact(tmp_path):
    straight, _ = run(tmp_path, "straight", steps=40)
    out = os.path.join(str(tmp_path), "resumed")
    common = SMALL + ["--steps", "40", "--out", out, "--ckpt-every", "10"]
    first = train(parse_args(common + ["--stop-after", "20"]))
    assert first["steps_done"] == 20 and not first["finished"]
    ck = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ck == ["step_0000010.pt", "step_0000020.pt"]
    second = train(parse_args(common + ["--resume", "auto"]))
    assert second["losses"] == straight["losses"], "resumed run differs from the straight run"
    # at most 3 kept, atomically written (no temporary files left)
    ck = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ck == ["step_0000020.pt", "step_0000030.pt", "step_0000040.pt"]
    assert os.path.exists(os.path.join(out, "summary.json"))
    assert os.path.exists(os.path.join(out, "training.png"))
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(out, "tb")))
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert lines[-1]["step"] == 40


def test_resume_from_an_earlier_checkpoint_rewrites_the_later_metrics(tmp_path):
    """A run that went past its checkpoint (a crash, or --resume PATH of an older one)
    logged steps the resumed run does again: metrics.jsonl keeps one record per step."""
    out = os.path.join(str(tmp_path), "o")
    common = SMALL + ["--steps", "10", "--out", out, "--ckpt-every", "5", "--log-every", "1"]
    train(parse_args(common + ["--stop-after", "8"]))
    train(parse_args(common + ["--resume", os.path.join(out, "checkpoints", "step_0000005.pt")]))
    steps = [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, 11))


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        load_checkpoint("auto", str(tmp_path))
    with pytest.raises(SystemExit, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"), str(tmp_path))
    bad = tmp_path / "step_0000001.pt"
    bad.write_bytes(b"\x80\x02garbage that is not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        load_checkpoint(str(bad), str(tmp_path))
    torch.save({"model": {}}, str(bad))
    with pytest.raises(SystemExit, match="not a model.train checkpoint"):
        load_checkpoint(str(bad), str(tmp_path))


def test_failed_checkpoint_write_leaves_nothing(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, interrupt) leaves no temporary file: it
    matched no checkpoint pattern, so nothing would ever prune it."""
    import model.train as mt

    def half_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mt.torch, "save", half_save)
    with pytest.raises(OSError):
        mt.save_checkpoint(str(tmp_path / "step_0000001.pt"), {"step": 1})
    assert os.listdir(tmp_path) == []


def test_checkpoint_is_flushed_before_its_rename(tmp_path, monkeypatch):
    """The data reaches the disk (fsync of the file) before the rename publishes it
    under the final name, and the rename itself is flushed (fsync of the folder):
    otherwise a power loss can leave a checkpoint name over an empty file."""
    import model.train as mt
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.getsize(a)))
        real_replace(a, b)

    monkeypatch.setattr(mt.os, "fsync", fsync)
    monkeypatch.setattr(mt.os, "replace", replace)
    path = tmp_path / "step_0000002.pt"
    mt.save_checkpoint(str(path), {"step": 2, "w": torch.arange(5)})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] is False and events[2][1] is True  # the file, then its folder
    assert events[1][1] > 0
    assert torch.load(path)["step"] == 2 and os.listdir(tmp_path) == [path.name]


def test_fp8_projections_train(tmp_path):
    """--fp8: every projection an FP8Linear and the experts FP8 (block-scaled e4m3
    forward, bf16 backward)."""
    res, out = run(tmp_path, "fp8", "--fp8", steps=6)
    assert res["finished"] and all(math.isfinite(l) for l in res["losses"])
    model, _, _ = gen.load_model("auto", out, torch.device("cpu"))
    from deepseek_kernels.nn import FP8Linear, Int8Linear
    assert isinstance(model.lm_head, FP8Linear) and model.text_blocks[0].moe.fp8
    # generate --int8 quantizes an FP8 model's projections too (it left them FP8, silently)
    gen.quantize_int8_(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())


def test_own_folder_of_images(tmp_path):
    """--data FOLDER: annotations.jsonl + image files of any size, split by image."""
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(12):
        img = Image.new("L", (24, 20), color=0)
        for x in range(24):  # a bright left or right half: the answer
            for y in range(20):
                if (x < 12) == (i % 2 == 0):
                    img.putpixel((x, y), 255)
        img.save(folder / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": "which side is bright ?",
                                 "answer": "left" if i % 2 == 0 else "right"}))
    (folder / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    res, out = run(tmp_path, "folder", "--data", str(folder), "--batch-size", "4", steps=5)
    assert res["finished"] and all(math.isfinite(l) for l in res["losses"])
    # a batch larger than the training set: short batches, and an empty micro-batch
    # under accumulation failed with "max() arg is an empty sequence"
    with pytest.raises(ValueError, match="training pairs"):
        run(tmp_path, "big", "--data", str(folder), "--batch-size", "16", "--accum-steps", "4",
            steps=1)
    (folder / "annotations.jsonl").write_text('{"image": "img0.png"}\n')
    with pytest.raises(ValueError, match="annotations.jsonl:1"):
        run(tmp_path, "bad", "--data", str(folder), steps=1)


def test_bad_flags():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "sgd"])


def test_yaml_config_lion_accumulation_unfreezing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer: lion\nlr: 0.0003\naccum_steps: 2\nfreeze_image_until: 5\n"
                   "align_steps: 3\n")
    args = parse_args(SMALL + ["--config", str(cfg), "--steps", "8", "--out", str(tmp_path / "o")])
    assert args.optimizer == "lion" and args.accum_steps == 2 and args.lr == 0.0003
    res = train(args)
    assert res["finished"] and len(res["losses"]) == 11
    assert all(math.isfinite(l) for l in res["losses"])
    bad = tmp_path / "b.yaml"
    bad.write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])


def test_accumulation_matches_the_full_batch_and_unfreezing_starts_on_time(tmp_path):
    """Two micro-batches of 16 give the full batch's gradient (every pair has the same
    number of answer targets, so the mean of the two means is the batch mean; the
    balancing loss differs by its batch composition only, ~1e-6): the same logged
    loss and pre-clip gradient norm. --freeze-image-until 2: the image tower is frozen
    for VQA steps 0 and 1 (checkpoints 1 and 2 hold its initial weights) and trains
    from step 2 on (checkpoint 3 differs)."""
    recs, ckdir = {}, {}
    for acc in (1, 2):
        out = os.path.join(str(tmp_path), f"acc{acc}")
        train(parse_args(SMALL + ["--steps", "3", "--out", out, "--log-every", "1", "--ckpt-every", "1",
                                  "--accum-steps", str(acc), "--freeze-image-until", "2",
                                  "--val-limit", "8"]))
        recs[acc] = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "grad_norm" in l]
        ckdir[acc] = os.path.join(out, "checkpoints")
    assert len(recs[1]) == len(recs[2]) == 3
    for r1, r2 in zip(recs[1], recs[2]):
        for key in ("loss", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4), (r1["step"], key)
    img = [torch.load(os.path.join(ckdir[1], f"step_{s:07d}.pt"), weights_only=False)["model"]["patch_embed.weight"]
           for s in (1, 2, 3)]
    assert torch.equal(img[0], img[1]) and not torch.equal(img[1], img[2])


@pytest.mark.parametrize("line", ["optimizer: sgd", "precision: fp17", "grad_compress: int16"])
def test_yaml_values_are_checked_like_flags(tmp_path, line):
    """argparse checks choices only on the command line: a YAML typo ran AdamW, fp32 or
    no compression instead, silently."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(line + "\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])


def test_accumulation_must_split_the_batch_evenly(tmp_path):
    """--batch-size 32 --accum-steps 3 made micro-batches of 10 and silently trained on
    30 of every 32 pairs: the trainer refuses a batch that does not split evenly."""
    with pytest.raises(SystemExit, match="accumulation"):
        run(tmp_path, "acc3", "--accum-steps", "3", steps=1)


# --------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, q, want_params=False):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        import model.train as mt

        made = []  # the trained model, caught where the trainer builds its optimizer
        make_optimizer = mt.make_optimizer
        mt.make_optimizer = lambda m, a: (made.append(m), make_optimizer(m, a))[1]
        res = train(parse_args(argv))
        if want_params:
            flat = torch.cat([p.detach().flatten() for p in made[0].parameters()])
            q.put((rank, (res["losses"], flat.tolist())))  # no tensor: it would not outlive us
            return
        q.put((rank, res["losses"]))
    except BaseException as e:  # report instead of hanging the parent
        q.put((rank, repr(e)))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def _ddp(tmp, name, *extra, steps=40, want_params=False):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    argv = SMALL + ["--steps", str(steps), "--out", os.path.join(str(tmp), name),
                    "--ckpt-every", "1000", *extra]
    argv[argv.index("--threads") + 1] = "1"
    port = _free_port()
    ps = [ctx.Process(target=_ddp_worker, args=(r, 2, port, argv, q, want_params), daemon=True)
          for r in range(2)]
    for p in ps:
        p.start()
    got = dict(q.get(timeout=300) for _ in ps)
    for p in ps:
        p.join(timeout=60)
    for r in (0, 1):
        assert not isinstance(got[r], str), f"rank {r} failed: {got[r]}"
    return got if want_params else got[0]


def test_ddp_gloo_with_and_without_int8_compression(tmp_path):
    single, _ = run(tmp_path, "single", steps=40)
    plain = _ddp(tmp_path, "ddp")
    int8 = _ddp(tmp_path, "ddp8", "--grad-compress", "int8")
    s = single["losses"][-1]
    for name, losses in (("ddp", plain), ("ddp int8", int8)):
        assert len(losses) == 40
        assert abs(losses[-1] - s) <= 0.02 * s, f"{name} final loss {losses[-1]} vs {s}"
    # the top-k sparsifying hook runs through the trainer too (5% of each bucket: it
    # learns more slowly, so only that it trains)
    topk = _ddp(tmp_path, "ddptopk", "--grad-compress", "topk", steps=20)
    assert all(math.isfinite(l) for l in topk) and topk[-1] < topk[0]


def test_ddp_logged_metrics_are_global_means(tmp_path):
    """Under DDP every logged loss term is the mean over the ranks: loss = ce + aux."""
    _ddp(tmp_path, "log", "--log-every", "1", steps=3)
    recs = [json.loads(l) for l in open(os.path.join(str(tmp_path), "log", "metrics.jsonl"))]
    assert len(recs) == 3
    for r in recs:
        assert abs(r["loss"] - (r["ce"] + r["aux"])) <= 1e-6 * r["loss"], r


def test_ddp_alignment_stage_keeps_replicas_equal(tmp_path):
    """--align-steps under DDP: the contrastive stage's gradients are averaged over the
    ranks like the VQA stage's, so every rank ends with the same parameters."""
    got = _ddp(tmp_path, "align", "--align-steps", "3", steps=1, want_params=True)
    assert got[0][1] == got[1][1], "the ranks' parameters differ"


def test_ddp_int8_resume_is_exact(tmp_path):
    """The error-feedback residuals are each rank's own: a resumed run must give every
    rank its own back, not rank 0's (the losses are the global means, so a wrong
    residual on rank 1 shows on rank 0's log)."""
    straight = _ddp(tmp_path, "straight", "--grad-compress", "int8", steps=10)
    _ddp(tmp_path, "resumed", "--grad-compress", "int8", "--stop-after", "5", steps=10)
    resumed = _ddp(tmp_path, "resumed", "--grad-compress", "int8", "--resume", "auto", steps=10)
    assert resumed == straight, "resumed DDP int8 run differs from the straight run"


# --------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained"))
    train(parse_args(SMALL + ["--steps", "400", "--out", out, "--ckpt-every", "400",
                              "--lr", "5e-3"]))
    return out


def test_dynamic_batching_matches_one_by_one(trained):
    model, tok, _ = gen.load_model("auto", trained, torch.device("cpu"))
    d = load_digits_vqa()
    _, val = split_by_image(d, 0.2, seed=1234)
    pairs = val.pairs()[::37][:60]
    reqs = [(val.images[i], q) for i, q, _ in pairs]
    batched = gen.answer_requests(model, tok, reqs, torch.device("cpu"), max_batch=16)
    single = [gen.answer_requests(model, tok, [r], torch.device("cpu"))[0] for r in reqs]
    assert batched == single
    assert all(a for a in batched), "empty answers"


def test_int8_accuracy_close_to_fp32(trained):
    model, tok, _ = gen.load_model("auto", trained, torch.device("cpu"))
    _, val = split_by_image(load_digits_vqa(), 0.2, seed=1234)
    sub = val.subset(range(0, len(val), 3))
    acc32 = gen.accuracy(model, tok, sub, torch.device("cpu"))
    acc8 = gen.accuracy(gen.quantize_int8_(model), tok, sub, torch.device("cpu"))
    assert acc32 > 0.5, f"the fixture model did not learn ({acc32:.3f})"
    assert abs(acc8 - acc32) <= 0.02, f"int8 {acc8:.4f} vs fp32 {acc32:.4f}"


def test_generate_cli(trained):
    r = subprocess.run([sys.executable, "-m", "model.generate", "--out", trained, "--images", "0,1",
                        "--question", "what digit is this ?"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("what digit is this ? ->") == 2


def test_generate_accuracy_compares_tokenized_answers():
    """A folder's answers are free text ("Yes", "a cat."): the generated words match
    them as the tokenizer reads them (lower case, '?' split off), as the trainer's
    teacher-forced accuracy does, not as raw strings."""
    tok = Tokenizer.build(["is it bright ?", "yes no", "a cat"])

    class Echo:  # answers each prompt with the given words
        def __init__(self, words):
            self.ids = tok.encode(words)

        def generate(self, images, ids):
            return [list(self.ids) for _ in range(len(ids))]

    data = VQAData(torch.zeros(2, 1, 8, 8), [[("is it bright ?", "Yes")], [("is it bright ?", "Yes")]])
    assert gen.accuracy(Echo("yes"), tok, data, torch.device("cpu")) == 1.0
    assert gen.accuracy(Echo("no"), tok, data, torch.device("cpu")) == 0.0


def test_generate_answers_longer_than_four_tokens():
    """Greedy decoding runs to <eos> (or max_text_len): a 6-word answer came back cut to
    4 words, and a 4-word one counted as whole without its <eos>."""
    class Scripted(MultimodalMoE):  # answers 10 11 12 13 14 15 <eos> after any prompt
        def forward(self, images, input_ids, image_features=None, contrastive=False):
            n = input_ids.shape[1] - 3
            logits = torch.zeros(*input_ids.shape, self.cfg.vocab_size)
            logits[:, -1, 10 + n if n < 6 else 3] = 1.0
            return logits

    model = Scripted(ModelConfig(vocab_size=20, dim=32, num_heads=2, num_kv_heads=1)).eval()
    out = model.generate(torch.zeros(2, 1, 8, 8), torch.tensor([[1, 5, 2], [1, 6, 2]]))
    assert out == [[10, 11, 12, 13, 14, 15]] * 2


def test_generate_eval_keeps_max_batch(tmp_path, monkeypatch):
    """--eval answers in batches of at most --max-batch, like the other modes."""
    _, out = run(tmp_path, "tiny", steps=1)
    sizes = []
    generate = MultimodalMoE.generate
    monkeypatch.setattr(MultimodalMoE, "generate",
                        lambda self, images, ids: (sizes.append(len(ids)), generate(self, images, ids))[1])
    gen.main(["--out", out, "--eval", "--eval-limit", "12", "--max-batch", "2"])
    assert sizes and max(sizes) <= 2, sizes


def test_contrastive_loss_ignores_caption_padding():
    """Captions of different lengths are right-padded (--align-steps on a folder's
    answers): the pooled caption must not depend on how much padding the batch adds."""
    torch.manual_seed(0)
    model = MultimodalMoE(ModelConfig(vocab_size=20, dim=32, num_heads=2, num_kv_heads=1))
    img = torch.rand(2, 1, 8, 8)
    caps = torch.tensor([[7, 8, 0], [9, 10, 11]])  # 0 = <pad>
    wider = torch.cat([caps, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.contrastive_loss(img, wider), model.contrastive_loss(img, caps))


@pytest.mark.parametrize("device", DEVICES)
def test_model_forward_backward_on_device(device):
    torch.manual_seed(0)
    model = MultimodalMoE(ModelConfig(vocab_size=50, dim=32, num_heads=2, num_kv_heads=1)).to(device)
    ref = MultimodalMoE(ModelConfig(vocab_size=50, dim=32, num_heads=2, num_kv_heads=1)).to(device)
    ref.load_state_dict(model.state_dict())
    ref.set_use_kernels(False)
    img = torch.rand(5, 1, 8, 8, device=device)
    ids = torch.randint(5, 50, (5, 7), device=device)
    y, yr = model(img, ids), ref(img, ids)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    y.square().mean().backward()
    yr.square().mean().backward()
    for (n, p), pr in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, pr.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_weight_decay_groups():
    """Decay on the linear maps' matrices (the patch embedding's too), none on the
    embedding and position tables, norms, biases and the logit scale."""
    import argparse

    from model.modeling import ModelConfig, MultimodalMoE
    from model.train import make_optimizer

    model = MultimodalMoE(ModelConfig(vocab_size=50))
    opt = make_optimizer(model, argparse.Namespace(weight_decay=0.1, optimizer="adamw", lr=1e-3))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"patch_embed.weight", "lm_head.weight", "text_blocks.0.moe.w_gate_up"} <= decayed
    assert not decayed & {"text_pos", "image_pos", "tok_emb.weight", "type_emb.weight", "logit_scale",
                          "final_norm.weight", "patch_embed.bias"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


def test_model_routes_real_tokens_and_sums_the_layers_aux_losses():
    """The text blocks' MoE layers get the padding mask (padding is not routed: each
    layer routes top_k choices per real token), and aux_loss() is the sum over the
    layers of their balancing losses."""
    from model.data import PAD

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, dim=16, num_heads=2, num_kv_heads=1, num_layers=2,
                      num_experts=4, top_k=2, expert_hidden=16, mlp_hidden=16)
    model = MultimodalMoE(cfg)
    ids = torch.randint(4, 30, (3, 7))
    ids[0, 3:] = PAD
    ids[2, 5:] = PAD
    model(torch.randn(3, 1, 8, 8), ids)
    for blk in model.text_blocks:
        assert int(blk.moe.last_routed_counts.sum()) == cfg.top_k * int((ids != PAD).sum())
    layers = [blk.moe.aux_loss.detach() for blk in model.text_blocks]
    assert all(float(a) > 0 for a in layers)
    torch.testing.assert_close(model.aux_loss().detach(), layers[0] + layers[1], rtol=1e-6, atol=0)


def test_lr_schedule():
    """Linear warm-up over warmup_steps (the first step already trains: lr / warmup),
    peak lr at the last warm-up step, cosine decay to lr * min_lr_ratio at the end."""
    import argparse

    from model.train import lr_at

    a = argparse.Namespace(lr=0.3, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, 20, a) for s in range(4)] == pytest.approx([0.075, 0.15, 0.225, 0.3])
    assert lr_at(4, 20, a) == pytest.approx(0.3)
    assert lr_at(12, 20, a) == pytest.approx(0.03 + 0.27 * 0.5)  # half way: cos = 0
    assert lr_at(20, 20, a) == pytest.approx(0.03) and lr_at(25, 20, a) == pytest.approx(0.03)
    decay = [lr_at(s, 20, a) for s in range(4, 21)]
    assert all(x > y for x, y in zip(decay, decay[1:]))


def test_lion_step():
    """Lion's update against its definition, two steps (the second uses the momentum):
    p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g."""
    from model.train import Lion

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 3, dtype=torch.float64))
    lr, wd, (b1, b2) = 0.01, 0.2, (0.9, 0.99)
    opt = Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    want, m = p.detach().clone(), torch.zeros_like(p)
    for _ in range(2):
        g = torch.randn_like(p)
        p.grad = g.clone()
        opt.step()
        want = want * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-12)


def test_resume_from_an_earlier_checkpoint_sets_later_ones_aside(tmp_path):
    """Resuming from step 10 of a run that reached step 30: the checkpoints of steps 20
    and 30 belong to the replaced run. With --keep-ckpts 1, pruning used to keep them
    (the highest steps) and delete the resumed run's own; they are moved aside."""
    out = os.path.join(str(tmp_path), "run")
    common = SMALL + ["--steps", "30", "--out", out, "--ckpt-every", "10", "--keep-ckpts", "3"]
    train(parse_args(common))
    ckdir = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["step_0000010.pt", "step_0000020.pt", "step_0000030.pt"]
    second = train(parse_args(common[:-1] + ["1", "--resume", os.path.join(ckdir, "step_0000010.pt"),
                                             "--stop-after", "20"]))
    assert second["steps_done"] == 20
    names = sorted(os.listdir(ckdir))
    assert [n for n in names if n.endswith(".pt")] == ["step_0000020.pt"]
    (aside,) = [n for n in names if n.startswith("abandoned-")]
    assert sorted(os.listdir(os.path.join(ckdir, aside))) == ["step_0000020.pt", "step_0000030.pt"]
    assert torch.load(os.path.join(ckdir, "step_0000020.pt"), weights_only=False)["step"] == 20
