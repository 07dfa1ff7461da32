"""A pre-norm Transformer whose FFN is an MoE layer in every `moe_every`-th block; LM and classifier heads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.config import ModelConfig
from moe_lab.moe import MoEConfig, MoELayer
from moe_lab.moe.experts import Experts


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (T5, ST-MoE)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    """RMSNorm or LayerNorm."""
    return RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim)


def real_tokens(pad_mask_BS: torch.Tensor | None) -> torch.Tensor | None:
    """The flat indices of a padded batch's real tokens (one host read on CUDA, once per forward), or None."""
    return None if pad_mask_BS is None else pad_mask_BS.flatten().nonzero().squeeze(1)


def on_real_tokens(
    fn: Callable[[torch.Tensor], torch.Tensor], x_BSD: torch.Tensor, real_N: torch.Tensor | None
) -> torch.Tensor:
    """A position-wise `fn` (rows [N, D] -> [N, W]) over the real tokens of x_BSD only (`real_tokens`), zeros at
    the padded positions; over every position when there is no padding. A classifier reads the real tokens alone
    (and a causal model's real tokens never attend to the padding on their right), so the padding's rows, about
    half of a fine-tuning batch of sentences padded to its longest, are work that changes nothing. Index ops, not
    boolean masks: they read nothing on the host."""
    if real_N is None:
        return fn(x_BSD)
    *lead, D = x_BSD.shape
    y_NW = fn(x_BSD.reshape(-1, D).index_select(0, real_N))
    y_TW = y_NW.new_zeros(x_BSD.numel() // D, y_NW.shape[-1]).index_copy(0, real_N, y_NW)
    return y_TW.view(*lead, -1)


class Attention(nn.Module):
    """Multi-head self-attention, causal or bidirectional, with an optional padding mask."""

    def __init__(self, d_model: int, num_heads: int, causal: bool, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x_BSD: torch.Tensor, pad_mask_BS: torch.Tensor | None = None, real_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`real_N` (`real_tokens(pad_mask_BS)`, which Block passes): the projections run on those tokens only
        (padded positions get zero queries, keys and values); None runs them on every position."""
        B, S, D = x_BSD.shape
        qkv = on_real_tokens(self.qkv, x_BSD, real_N)
        q, k, v = qkv.view(B, S, 3, self.num_heads, D // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        # True = real token. Padding is on the right, so a causal model never attends to it anyway;
        # a bidirectional one must not attend to padded keys.
        if pad_mask_BS is not None and not self.causal:
            mask = pad_mask_BS[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return on_real_tokens(self.out, y.transpose(1, 2).reshape(B, S, D), real_N)


class DenseFFN(nn.Module):
    """A dense FFN: one expert's weights and activation, without routing."""

    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.ffn = Experts(1, d_model, d_ff, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn.forward_one(x, self.ffn.w_in_EDH[0], self.ffn.w_out_EFD[0])


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) [+ a stacked dense FFN]."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module, stacked: nn.Module | None) -> None:
        super().__init__()
        self.norm_attn = make_norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.causal, cfg.dropout)
        self.norm_ffn = make_norm(cfg.norm, cfg.d_model)
        self.ffn = ffn
        self.norm_stacked = make_norm(cfg.norm, cfg.d_model) if stacked is not None else None
        self.stacked = stacked
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        real_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`real_N`: `real_tokens(pad_mask)`, computed here when not given."""
        if real_N is None:
            real_N = real_tokens(pad_mask)
        x = x + self.drop(self.attn(self.norm_attn(x), pad_mask, real_N))
        h = self.norm_ffn(x)
        if isinstance(self.ffn, MoELayer):
            # padding must not take expert capacity or count in the routing metrics: route real tokens only
            real_ids = ids if ids is None or real_N is None else ids.flatten().index_select(0, real_N)
            y = on_real_tokens(lambda h_ND: self.ffn(h_ND, real_ids), h, real_N)
        else:
            y = on_real_tokens(self.ffn, h, real_N)
        x = x + self.drop(y)
        if self.stacked is not None:
            x = x + self.drop(on_real_tokens(self.stacked, self.norm_stacked(x), real_N))
        return x


def is_moe_position(layer: int, moe_every: int) -> bool:
    """Whether block `layer` (0-based) holds an MoE layer: blocks moe_every-1, 2*moe_every-1, ..."""
    return moe_every > 0 and (layer + 1) % moe_every == 0


class Transformer(nn.Module):
    """Token + learned position embeddings, blocks, final norm: ids [B, S] -> hidden [B, S, D]."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # hash routing and StableMoE's distilled router look up token ids
        moe = replace(moe, d_model=cfg.d_model, vocab_size=vocab_size)
        blocks = []
        for i in range(cfg.num_layers):
            stacked = None
            if is_moe_position(i, cfg.moe_every) and cfg.sparse:
                ffn: nn.Module = MoELayer(moe)
                if cfg.dense_stacking:
                    stacked = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
            elif is_moe_position(i, cfg.moe_every):
                # the dense twin: k experts' worth of FFN width gives the same FLOPs per token
                ffn = DenseFFN(cfg.d_model, moe.top_k * moe.d_ff, moe.activation, cfg.dropout)
                if cfg.dense_stacking:
                    stacked = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
            else:
                ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
            blocks.append(Block(cfg, ffn, stacked))
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(cfg.norm, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids_BS: torch.Tensor, pad_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        S = ids_BS.shape[1]
        if self.cfg.max_seq_len < S:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.drop(self.embed(ids_BS) + self.pos(torch.arange(S, device=ids_BS.device)))
        real_N = real_tokens(pad_mask_BS)
        for block in self.blocks:
            x = block(x, pad_mask_BS, ids_BS, real_N)
        return self.norm(x)


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) of every MoE layer in a model, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


@dataclass
class ModelLosses:
    """The task loss and the MoE terms added to it; `total` is what backward() sees."""

    task: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    output_z: torch.Tensor
    distill: torch.Tensor | None = None  # StableMoE's distillation loss, summed over layers

    @property
    def total(self) -> torch.Tensor:
        total = self.task + self.aux + self.z + self.output_z
        return total if self.distill is None else total + self.distill


def collect_moe_losses(model: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of the scaled aux, z and distillation losses of every MoE layer's last forward."""
    aux, z, distill = like.new_zeros(()), like.new_zeros(()), like.new_zeros(())
    for _, layer in moe_layers(model):
        losses = layer.last_losses
        if losses is not None:
            aux = aux + losses.aux_loss_scaled
            z = z + losses.z_loss_scaled
            if losses.distill_loss_scaled is not None:
                distill = distill + losses.distill_loss_scaled
    return aux, z, distill


class LanguageModel(nn.Module):
    """A causal LM: next-token cross-entropy plus the MoE losses."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg, moe, vocab_size)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.transformer.embed.weight

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V]."""
        h = self.transformer(ids_BS)
        if self.cfg.tie_embeddings:  # scale as in Mesh TensorFlow / T5 when the embedding is shared
            h = h * self.cfg.d_model**-0.5
        return self.head(h)

    def losses(self, ids_BS: torch.Tensor, targets_BS: torch.Tensor) -> ModelLosses:
        """Cross-entropy of the targets, the MoE aux and z losses, the output-logit z-loss."""
        logits = self.forward(ids_BS).float()
        task = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets_BS.reshape(-1))
        aux, z, distill = collect_moe_losses(self, task)
        output_z = task.new_zeros(())
        if self.cfg.output_z_loss_coef > 0:
            output_z = self.cfg.output_z_loss_coef * torch.logsumexp(logits, -1).square().mean()
        return ModelLosses(task, aux, z, output_z, distill)


class ClassifierModel(nn.Module):
    """The Transformer (causal as pretrained, or bidirectional) with a classification head on its pooled output:
    the mean over the real tokens, or the last real token (a causal model's summary of the whole text, the
    position that predicts what comes next: how GPT-style models classify, and how a cloze task is read)."""

    def __init__(
        self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int, num_classes: int, pooling: str = "mean"
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling={pooling!r} is not one of ['mean', 'last']")
        self.cfg, self.pooling = cfg, pooling
        self.transformer = Transformer(cfg, moe, vocab_size)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, ids_BS: torch.Tensor, pad_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, C]."""
        h_BSD = self.transformer(ids_BS, pad_mask_BS)
        if pad_mask_BS is None:
            pad_mask_BS = torch.ones(ids_BS.shape, dtype=torch.bool, device=ids_BS.device)
        if self.pooling == "last":  # padding is on the right: the last real token is at length - 1
            last_B = (pad_mask_BS.sum(1) - 1).clamp(min=0)
            return self.head(h_BSD[torch.arange(h_BSD.shape[0], device=h_BSD.device), last_B])
        weights = pad_mask_BS.to(h_BSD.dtype)[..., None]
        return self.head((h_BSD * weights).sum(1) / weights.sum(1).clamp(min=1))

    def losses(self, ids_BS: torch.Tensor, labels_B: torch.Tensor, pad_mask_BS: torch.Tensor | None = None):
        """Cross-entropy of the labels plus the MoE losses."""
        logits = self.forward(ids_BS, pad_mask_BS).float()
        task = F.cross_entropy(logits, labels_B)
        aux, z, distill = collect_moe_losses(self, task)
        return ModelLosses(task, aux, z, task.new_zeros(()), distill)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters, and active ones: everything but experts, plus top_k experts per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    expert_total = expert_active = 0
    for _, layer in moe_layers(model):
        n = sum(p.numel() for p in layer.experts.parameters())
        expert_total += n
        k = layer.config.top_k
        expert_active += n * min(k, layer.config.num_experts) // layer.config.num_experts
    return {"total": total, "active": total - expert_total + expert_active, "experts": expert_total}


def flops_per_token(cfg: ModelConfig, moe: MoEConfig, vocab_size: int, seq_len: int) -> int:
    """Forward multiply-adds x2 per token (Kaplan et al. 2020 style, no norms/softmax).

    Attention: 4 d^2 projections + 2 S d for scores and values (causal halving ignored). FFN of width F:
    d*H + F*d with H = 2F when gated. An MoE layer runs k experts per token plus a d*E router, so the
    dense twin (width k*F at those positions) matches it to within the router's 2dE.
    """
    d = cfg.d_model

    def ffn(width: int, activation: str) -> int:
        hidden = 2 * width if activation in ("geglu", "swiglu") else width
        return d * hidden + width * d

    total = 0
    for i in range(cfg.num_layers):
        total += 4 * d * d + 2 * seq_len * d
        if is_moe_position(i, cfg.moe_every):
            total += (moe.top_k * ffn(moe.d_ff, moe.activation)) + (d * moe.num_experts if cfg.sparse else 0)
            if cfg.dense_stacking:
                total += ffn(cfg.d_ff, cfg.activation)
        else:
            total += ffn(cfg.d_ff, cfg.activation)
    total += d * vocab_size
    return 2 * total
