"""StableMoE's pieces (Dai et al. 2022, ACL, arXiv 2204.08396): the balance loss and the distilled router.

Stage 1 routes every token greedily to argmax_i s_ti, s_ti = E_i . h_t (the paper's Eq. 7; E_i are the
expert centroids, our `LearnedRouter` weights) and gates the expert's output by sigmoid(s_t,a_t). The balance loss
pushes overloaded experts' scores down and underloaded ones' up; a light router (its own token embedding
and centroids) learns to predict the stage-1 assignment from the token id alone. Stage 2 freezes that
light router and routes by it, so a token's expert never changes again; only the task loss trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.moe.routing import count


def stablemoe_balance_loss(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> torch.Tensor:
    """StableMoE's balance loss sum_i ((|A_i| - n_bar) / n_bar) * sum_{t in A_i} sigmoid(s_ti), per token.

    A_i are the tokens routed to expert i and n_bar = T / E (StableMoE Sec. 3.1, the balance loss L_bal).
    The paper writes a sum over the batch; we divide by the token count, as fairseq (the paper's code base)
    normalises its losses by the number of tokens, so the coefficient (alpha = 0.3) means the same at any
    batch size. |A_i| carries no gradient: the loss lowers the scores of overloaded experts.
    """
    num_tokens, num_experts = scores_TE.shape
    with torch.no_grad():
        load_E = count(expert_T, num_experts).float()
        mean_load = num_tokens / num_experts
        excess_E = (load_E - mean_load) / mean_load
    chosen_T = torch.sigmoid(scores_TE.float().gather(1, expert_T[:, None]).squeeze(1))
    return (excess_E[expert_T] * chosen_T).sum() / max(num_tokens, 1)


class DistilledRouter(nn.Module):
    """The light router of StableMoE: a token embedding and expert centroids, routing by token id only.

    Trained in stage 1 by cross-entropy toward the stage-1 assignment (the paper's distillation loss
    L_dis), frozen for stage 2 (`frozen`, a buffer, so checkpoints and fine-tuning keep the stage).
    """

    def __init__(self, vocab_size: int, num_experts: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.centroids = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.centroids, std=1.0 / math.sqrt(dim))

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        """Distilled routing logits d_TE = D(x_t) . C_i, in float32."""
        with torch.autocast(ids_T.device.type, enabled=False):
            return F.linear(self.embed(ids_T).float(), self.centroids.float())

    def distill_loss(self, ids_T: torch.Tensor, expert_T: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the distilled logits toward the stage-1 experts (the paper's L_dis)."""
        return F.cross_entropy(self(ids_T), expert_T.detach())

    @torch.no_grad()
    def route(self, ids_T: torch.Tensor) -> torch.Tensor:
        """The stage-2 expert of every token: argmax of the distilled logits; no gradient, ever."""
        return self(ids_T).argmax(dim=-1)

    def freeze(self) -> None:
        """Enter stage 2: from now on this router decides and stops learning."""
        self.frozen.fill_(True)
        self.requires_grad_(False)
