"""A small DeepSeek-style multimodal MoE transformer built from deepseek_kernels.nn.

    image [B, 1, 8, 8] -> 2x2 patches -> Linear patch embedding + position + modality type
        -> image blocks: RMSNorm, bidirectional self-attention, RMSNorm, GELU MLP
    text ids [B, L]    -> embedding + position + modality type
        -> text blocks: RMSNorm, causal self-attention,
                        RMSNorm, cross-attention from the text to the image tokens,
                        RMSNorm, MoE feed-forward (top-k routed SwiGLU experts + a shared one)
        -> RMSNorm -> Linear head over the vocabulary

Every projection is a ``deepseek_kernels.nn.Linear`` (fused bias + activation epilogue),
every attention a ``deepseek_kernels.nn.CrossAttention`` (the self-attentions pass no
context), every FFN in the text blocks a ``deepseek_kernels.nn.MoELayer``.
``set_use_kernels(False)`` routes the same parameters through ``deepseek_kernels.reference``
(pure PyTorch), so the two paths can be compared step by step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepseek_kernels import nn as dnn

from model.data import PAD


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2          # grouped-query attention: 2 query heads per K/V head
    num_layers: int = 2            # text blocks
    image_layers: int = 1
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    mlp_hidden: int = 128          # image-block MLP
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 64
    num_shared_experts: int = 1
    capacity_factor: Optional[float] = None   # None: dropless (permute + grouped GEMM)
    aux_loss_alpha: float = 0.01
    bias_update_rate: float = 0.0             # > 0: DeepSeek-V3 aux-loss-free balancing
    max_text_len: int = 32
    fp8: bool = False              # FP8 block-scaled projections and experts

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _linear(cfg: ModelConfig, n_in: int, n_out: int, bias: bool = True, activation: str = "none"):
    if cfg.fp8:
        return dnn.FP8Linear(n_in, n_out, bias=bias, activation=activation)
    return dnn.Linear(n_in, n_out, bias=bias, activation=activation)


class ImageBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = dnn.CrossAttention(cfg.dim, cfg.num_heads, cfg.num_kv_heads)
        self.mlp_in = _linear(cfg, cfg.dim, cfg.mlp_hidden, activation="gelu")
        self.mlp_out = _linear(cfg, cfg.mlp_hidden, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp_out(self.mlp_in(self.norm2(x)))


class TextBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = RMSNorm(cfg.dim), RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.self_attn = dnn.CrossAttention(cfg.dim, cfg.num_heads, cfg.num_kv_heads)
        self.cross_attn = dnn.CrossAttention(cfg.dim, cfg.num_heads, cfg.num_kv_heads)
        self.moe = dnn.MoELayer(cfg.dim, cfg.expert_hidden, cfg.num_experts, cfg.top_k,
                                num_shared_experts=cfg.num_shared_experts,
                                capacity_factor=cfg.capacity_factor,
                                aux_loss_alpha=cfg.aux_loss_alpha,
                                bias_update_rate=cfg.bias_update_rate, fp8=cfg.fp8)

    def forward(self, x: Tensor, image: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x), causal=True)
        x = x + self.cross_attn(self.norm2(x), image)
        # padding is not routed: it would take capacity slots from real tokens
        # (capacity mode keeps the earliest), and count in the balancing loss
        return x + self.moe(self.norm3(x), token_mask)


class MultimodalMoE(nn.Module):
    TEXT, IMAGE = 0, 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        patch_dim = cfg.channels * cfg.patch_size ** 2
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_pos = nn.Parameter(torch.randn(cfg.max_text_len, cfg.dim) * 0.02)
        self.type_emb = nn.Embedding(2, cfg.dim)
        self.patch_embed = _linear(cfg, patch_dim, cfg.dim)
        self.image_pos = nn.Parameter(torch.randn(n_patches, cfg.dim) * 0.02)
        self.image_blocks = nn.ModuleList(ImageBlock(cfg) for _ in range(cfg.image_layers))
        self.image_norm = RMSNorm(cfg.dim)
        self.text_blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.dim)
        self.lm_head = _linear(cfg, cfg.dim, cfg.vocab_size, bias=False)
        # CLIP-style alignment stage (optional, before VQA training)
        self.image_proj = _linear(cfg, cfg.dim, cfg.dim, bias=False)
        self.text_proj = _linear(cfg, cfg.dim, cfg.dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    # -- switches ------------------------------------------------------------
    def set_use_kernels(self, flag: bool) -> "MultimodalMoE":
        """True: deepseek_kernels ops; False: the same parameters through reference.py."""
        for m in self.modules():
            if hasattr(m, "use_kernels") and m is not self:
                m.use_kernels = flag
        return self

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """For gradual unfreezing: the image tower, the text tower, the head."""
        image = list(self.patch_embed.parameters()) + [self.image_pos] + \
            list(self.image_blocks.parameters()) + list(self.image_norm.parameters())
        head = list(self.lm_head.parameters()) + list(self.final_norm.parameters())
        seen = {id(p) for p in image + head}
        text = [p for p in self.parameters() if id(p) not in seen]
        return {"image": image, "text": text, "head": head}

    # -- forward ---------------------------------------------------------------
    def patchify(self, images: Tensor) -> Tensor:
        b, c, s, _ = images.shape
        p = self.cfg.patch_size
        x = images.unfold(2, p, p).unfold(3, p, p)              # [B, C, S/p, S/p, p, p]
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (s // p) ** 2, c * p * p)

    def encode_image(self, images: Tensor) -> Tensor:
        x = self.patch_embed(self.patchify(images))
        x = x + self.image_pos + self.type_emb.weight[self.IMAGE]
        for blk in self.image_blocks:
            x = blk(x)
        return self.image_norm(x)

    def embed_text(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        if n > self.cfg.max_text_len:
            raise ValueError(f"text of {n} tokens exceeds max_text_len={self.cfg.max_text_len}")
        return self.tok_emb(input_ids) + self.text_pos[:n] + self.type_emb.weight[self.TEXT]

    def forward(self, images: Tensor, input_ids: Tensor, image_features: Optional[Tensor] = None,
                contrastive: bool = False) -> Tensor:
        """Logits [B, L, vocab] for next-token prediction; ``contrastive=True``: the
        alignment loss of ``input_ids`` as captions (here so that a DDP wrapper's
        forward runs it, and its reducer sees that graph)."""
        if contrastive:
            return self.contrastive_loss(images, input_ids)
        img = self.encode_image(images) if image_features is None else image_features
        x = self.embed_text(input_ids)
        token_mask = input_ids != PAD
        for blk in self.text_blocks:
            x = blk(x, img, token_mask)
        return self.lm_head(self.final_norm(x))

    def aux_loss(self) -> Tensor:
        losses = [blk.moe.aux_loss for blk in self.text_blocks]
        return torch.stack([l.float() for l in losses]).sum()

    def answer_loss(self, logits: Tensor, tgt: Tensor) -> Dict[str, Tensor]:
        """Cross-entropy on the answer tokens (targets -100 elsewhere) + the MoE
        balancing losses of the forward that made ``logits``; answer_acc = exact match."""
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             ignore_index=-100)
        aux = self.aux_loss()
        with torch.no_grad():
            m = tgt != -100
            correct = ((logits.argmax(-1) == tgt) | ~m).all(dim=1).float().mean()
        return {"loss": ce + aux, "ce": ce.detach(), "aux": aux.detach(), "answer_acc": correct}

    def contrastive_loss(self, images: Tensor, caption_ids: Tensor) -> Tensor:
        """Symmetric InfoNCE between the pooled image tokens and the pooled caption."""
        zi = self.image_proj(self.encode_image(images).mean(1))
        # mean over the caption's own tokens: the right padding (<pad> = 0) depends on
        # the longest caption of the batch
        keep = (caption_ids != PAD).unsqueeze(-1).to(self.tok_emb.weight.dtype)
        zt = self.text_proj((self.embed_text(caption_ids) * keep).sum(1) / keep.sum(1).clamp(min=1))
        zi, zt = F.normalize(zi.float(), dim=-1), F.normalize(zt.float(), dim=-1)
        logits = zi @ zt.t() * self.logit_scale.exp().clamp(max=100.0)
        target = torch.arange(len(zi), device=zi.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    @torch.no_grad()
    def generate(self, images: Tensor, prompt_ids: Tensor, max_new_tokens: Optional[int] = None,
                 eos_id: int = 3) -> List[List[int]]:
        """Greedy answers for a batch of prompts of equal length (dynamic batching puts
        same-length prompts together); returns the new tokens per row, without <eos>.
        ``max_new_tokens=None``: until <eos> or max_text_len (a fixed 4 cut longer
        answers short, and took a 4-word answer as whole without its <eos>)."""
        img = self.encode_image(images)
        ids = prompt_ids
        out: List[List[int]] = [[] for _ in range(len(ids))]
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(self.cfg.max_text_len if max_new_tokens is None else max_new_tokens):
            nxt = self(images, ids, image_features=img)[:, -1].argmax(-1)
            for r in range(len(ids)):
                if not done[r] and int(nxt[r]) != eos_id:
                    out[r].append(int(nxt[r]))
            done |= nxt == eos_id
            if bool(done.all()) or ids.shape[1] >= self.cfg.max_text_len:
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return out
