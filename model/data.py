"""Data for the multimodal model: digit images with generated questions and answers.

The default source is scikit-learn's handwritten digits (``load_digits``: 1,797 8x8
grey images, shipped with the package, no download). Questions and answers are
generated from the labels, so every image gives several (question, answer) pairs:

    what digit is this ?          -> seven
    is it even ? / is it odd ?    -> yes | no
    is it larger than 4 ?         -> yes | no      (every threshold 0..8)
    is it smaller than 6 ?        -> yes | no      (every threshold 1..9)
    is it a prime ?               -> yes | no

Train and validation are split by image, so validation images are never seen.

A user's own data: a folder with ``annotations.jsonl``, one JSON object per line,
``{"image": "relative/path.png", "question": "...", "answer": "..."}``. Images are
read with Pillow (or matplotlib), converted to grey and resized to ``image_size``
squared by area averaging; the split is by image path.

The tokenizer is word-level and ours: lower-cased words split on spaces, ``?``
its own word; special tokens <pad> <bos> <sep> <eos> <unk>.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = ["<pad>", "<bos>", "<sep>", "<eos>", "<unk>"]
PAD, BOS, SEP, EOS, UNK = range(len(SPECIALS))
_PRIMES = {2, 3, 5, 7}


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def digit_questions(label: int) -> List[Tuple[str, str]]:
    """Every (question, answer) pair the generator asks about a digit ``label``."""
    qa = [("what digit is this ?", DIGIT_WORDS[label]),
          ("is it even ?", _yes_no(label % 2 == 0)),
          ("is it odd ?", _yes_no(label % 2 == 1)),
          ("is it a prime ?", _yes_no(label in _PRIMES))]
    qa += [(f"is it larger than {n} ?", _yes_no(label > n)) for n in range(0, 9)]
    qa += [(f"is it smaller than {n} ?", _yes_no(label < n)) for n in range(1, 10)]
    return qa


def split_words(text: str) -> List[str]:
    return text.lower().replace("?", " ? ").split()


class Tokenizer:
    """Word-level tokenizer; the vocabulary is fixed when built and saved with checkpoints."""

    def __init__(self, words: Sequence[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Sequence[str]) -> "Tokenizer":
        words = sorted({w for t in texts for w in split_words(t)})
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(w, UNK) for w in split_words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (PAD, BOS, SEP, EOS))

    def prompt(self, question: str) -> List[int]:
        """<bos> question <sep>: the model answers after <sep>."""
        return [BOS] + self.encode(question) + [SEP]

    def state_dict(self) -> Dict:
        return {"itos": self.itos}

    @classmethod
    def from_state_dict(cls, d: Dict) -> "Tokenizer":
        return cls([w for w in d["itos"] if w not in SPECIALS])


@dataclass
class VQAData:
    """Images [N, 1, S, S] in [0, 1], and per image its (question, answer) pairs."""

    images: Tensor
    qa: List[List[Tuple[str, str]]]
    labels: Optional[Tensor] = None  # the digit, for the contrastive captions

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: Sequence[int]) -> "VQAData":
        idx = list(idx)
        return VQAData(self.images[idx], [self.qa[i] for i in idx],
                       None if self.labels is None else self.labels[idx])

    def pairs(self) -> List[Tuple[int, str, str]]:
        """Every (image index, question, answer), in order."""
        return [(i, q, a) for i, qa in enumerate(self.qa) for q, a in qa]


def load_digits_vqa() -> VQAData:
    """scikit-learn's digits; ``DSK_DIGITS_CSV`` may point at a copy of its
    ``digits.csv.gz`` (64 pixel values 0..16 and the label per line) on a machine
    without scikit-learn."""
    path = os.environ.get("DSK_DIGITS_CSV")
    if path:
        import gzip

        with gzip.open(path, "rt") as f:
            rows = torch.tensor([[float(v) for v in line.split(",")] for line in f if line.strip()])
        pixels, target = rows[:, :64], rows[:, 64]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    images = pixels.view(-1, 1, 8, 8).float() / 16.0
    labels = target.long()
    return VQAData(images, [digit_questions(int(y)) for y in labels], labels)


def read_grey_image(path: str, size: int) -> Tensor:
    try:
        from PIL import Image

        with Image.open(path) as im:
            g = im.convert("L")
            arr = torch.frombuffer(bytearray(g.tobytes()), dtype=torch.uint8)
            img = arr.view(g.size[1], g.size[0]).float() / 255.0
    except ImportError:
        import matplotlib.image as mpimg

        a = torch.as_tensor(mpimg.imread(path), dtype=torch.float32)
        img = a[..., :3].mean(-1) if a.dim() == 3 else a
        if img.max() > 1:
            img = img / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(img[None, None], size)[0]


def load_folder_vqa(folder: str, image_size: int = 8) -> VQAData:
    """A folder with annotations.jsonl (see the module docstring)."""
    ann = os.path.join(folder, "annotations.jsonl")
    if not os.path.isfile(ann):
        raise FileNotFoundError(f"{folder}: expected an annotations.jsonl file (one JSON object "
                                "per line with keys image, question, answer)")
    by_image: Dict[str, List[Tuple[str, str]]] = {}
    with open(ann) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_image.setdefault(rec["image"], []).append((rec["question"], rec["answer"]))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{ann}:{n}: bad annotation ({e}); expected "
                                 '{"image": ..., "question": ..., "answer": ...}') from e
    paths = sorted(by_image)
    images = torch.stack([read_grey_image(os.path.join(folder, p), image_size) for p in paths])
    return VQAData(images, [by_image[p] for p in paths])


def split_by_image(data: VQAData, val_fraction: float, seed: int) -> Tuple[VQAData, VQAData]:
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(order) * val_fraction)))
    return data.subset(sorted(order[n_val:])), data.subset(sorted(order[:n_val]))


def encode_example(tok: Tokenizer, question: str, answer: str) -> Tuple[List[int], List[int]]:
    """Input ids ``<bos> q <sep> a`` and next-token targets, -100 outside the answer:
    the loss is on the answer words and the final <eos> only."""
    prompt = tok.prompt(question)
    ans = tok.encode(answer) + [EOS]
    ids = prompt + ans[:-1]
    targets = [-100] * (len(prompt) - 1) + ans
    return ids, targets


def collate(tok: Tokenizer, data: VQAData, batch: Sequence[Tuple[int, str, str]]
            ) -> Dict[str, Tensor]:
    """Right-padded batch; padding sits after every real token, so the causal text
    attention never lets a real position see it."""
    enc = [encode_example(tok, q, a) for _, q, a in batch]
    width = max(len(i) for i, _ in enc)
    ids = torch.full((len(batch), width), PAD, dtype=torch.long)
    tgt = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, (i, t) in enumerate(enc):
        ids[r, :len(i)] = torch.tensor(i)
        tgt[r, :len(t)] = torch.tensor(t)
    images = data.images[[b[0] for b in batch]]
    return {"images": images, "input_ids": ids, "targets": tgt}


def question_kind(question: str) -> str:
    """'is it larger than 4 ?' -> 'is it larger': the kind, for balancing and reporting."""
    return " ".join(question.split()[:3])


def balanced_pairs(data: VQAData) -> List[Tuple[int, str, str]]:
    """Every (image, question, answer), with each image's question kinds repeated to the
    same count: a digit has 9 'larger than' questions but one 'what digit', and the
    latter carries the most signal about the image."""
    out = []
    for i, qa in enumerate(data.qa):
        kinds: Dict[str, List[Tuple[str, str]]] = {}
        for q, a in qa:
            kinds.setdefault(question_kind(q), []).append((q, a))
        n = max(len(v) for v in kinds.values())
        for v in kinds.values():
            out += [(i, q, a) for q, a in (v * n)[:n]]
    return out


class PairSampler:
    """Deterministic stream of (image, question, answer) batches: epoch e is a
    permutation drawn from (seed, e), so batch n is a pure function of (seed, n) and a
    resumed run sees exactly the batches an uninterrupted one would. With several ranks
    each takes its own slice of every global batch."""

    def __init__(self, pairs: List[Tuple[int, str, str]], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the world size ({world})")
        if batch_size > len(pairs):  # every batch would be short, the ranks' slices uneven
            raise ValueError(f"batch_size ({batch_size}) exceeds the {len(pairs)} training pairs")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, len(pairs) // batch_size)
        self._epoch, self._perm = -1, None

    def batch(self, n: int) -> List[Tuple[int, str, str]]:
        epoch, j = divmod(n, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.pairs), generator=g).tolist()
            self._epoch = epoch
        idx = self._perm[j * self.batch_size:(j + 1) * self.batch_size]
        local = self.batch_size // self.world
        return [self.pairs[i] for i in idx[self.rank * local:(self.rank + 1) * local]]
