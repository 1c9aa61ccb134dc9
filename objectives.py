"""What a model learns from a batch of pairs: train.py's --loss and --both_orders.

    ce            cross-entropy of the pair classifier over {not duplicate, duplicate}: the default,
                  and the only term the classifier head learns from (model.pair_loss)
    mnrl          multiple-negatives ranking loss (Henderson et al. 2017, sentence-transformers'
                  MultipleNegativesRankingLoss), both directions: each duplicate pair (q1, q2) of
                  the batch is a query q1 whose answer is q2 among every q2 of the batch, and q2's
                  answer is q1 among every q1; the other pairs' questions are its negatives. It
                  shapes the vectors for search (cosine), which ce alone does not.
    contrastive   online contrastive loss (sentence-transformers' OnlineContrastiveLoss): only the
                  hard pairs of the batch count, duplicates farther apart (1 - cosine) than the
                  closest non-duplicate, and non-duplicates closer than the farthest duplicate
                  (pushed beyond --contrastive_margin)
    distill       cross-entropy toward a teacher's probabilities (teach.py, train.py --teacher_file),
                  over the training pairs and the unlabelled mined ones: the pair classifier learns
                  what the teacher (a cross-encoder, or a mean of checkpoints) says
    both_orders   the classifier sees (q1, q2) and (q2, q1), each at half weight: the symmetric
                  augmentation, without encoding anything twice

--loss combines ce with the others ("ce+mnrl", "ce+contrastive", "ce+mnrl+contrastive",
"ce+distill"), or is "distill" alone; each term after the first is weighted by --aux_weight. Every
term is a sum over the batch's pairs (engine.train_step divides by the step's pairs), and fill
pairs (label text.NO_LABEL) add nothing. The in-batch negatives of mnrl are those of one
micro-batch on one process: --grad_accum_steps and DDP change them (ce and contrastive are exact
under both).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import pair_loss

LOSSES = ("ce", "ce+mnrl", "ce+contrastive", "ce+mnrl+contrastive", "distill", "ce+distill")


@dataclass
class Objective:
    loss: str = "ce"                 # one of LOSSES
    aux_weight: float = 1.0          # weight of mnrl / contrastive next to ce
    mnrl_scale: float = 20.0         # cosine -> logit scale of mnrl (sentence-transformers' default)
    contrastive_margin: float = 0.5  # non-duplicates are pushed to 1 - cosine >= margin
    both_orders: bool = False        # ce on (q1, q2) and (q2, q1), half weight each

    @property
    def terms(self):
        return self.loss.split("+")

    @property
    def needs_vectors(self):
        return bool(set(self.terms) & {"mnrl", "contrastive"}) or self.both_orders

    def weight(self, term):
        return 1.0 if term == self.terms[0] else self.aux_weight


def batch_loss(model, batch, objective=Objective(), teacher_probs=None):
    """The summed loss of one batch under the objective: a 0-dim fp32 tensor. teacher_probs (M,):
    p(duplicate) of every pair of the training set by index (distill)."""
    labels = batch["labels"]  # (B,)
    if not objective.needs_vectors:
        logits, reversed_logits = model(batch), None  # (B, 2)
    else:
        logits, reversed_logits, u, v = model(batch, with_vectors=True)  # (B, 2), (B, 2), (B, H), (B, H)

    def classifier(term):  # a loss of the logits; both orders at half weight each
        out = term(logits)
        return (out + term(reversed_logits)) / 2 if objective.both_orders else out

    loss = 0.0
    for name in objective.terms:
        if name == "ce":
            term = classifier(lambda lg: pair_loss(lg, labels))
        elif name == "distill":
            term = classifier(lambda lg: distill_loss(lg, batch["index"], teacher_probs))
        elif name == "mnrl":
            term = mnrl_loss(u, v, labels, batch["q_key"], objective.mnrl_scale)
        else:
            term = online_contrastive_loss(u, v, labels, objective.contrastive_margin)
        loss = loss + objective.weight(name) * term
    return loss


def distill_loss(logits, index, teacher_probs):
    """Cross-entropy toward the teacher's probabilities, summed over the batch's pairs. logits
    (B, 2); index (B,) each pair's row in the training set (-1: a fill pair, which adds nothing);
    teacher_probs (M,) on the logits' device."""
    p = teacher_probs[index.clamp(min=0)]  # (B,)
    logp = logits.float().log_softmax(-1)  # (B, 2)
    per_pair = -((1 - p) * logp[:, 0] + p * logp[:, 1])
    return torch.where(index >= 0, per_pair, 0.0).sum()


def mnrl_loss(u, v, labels, keys, scale):
    """Multiple-negatives ranking loss of the duplicate pairs, both directions averaged, summed over
    those pairs. u, v (B, H) vectors of q1 and q2; keys (2B,) equal for identical questions (the
    collator's q_key: q1s, then q2s). A candidate that is the query itself or another copy of its
    answer (QQP's hub questions come in many pairs) is no negative; fill pairs are no candidates."""
    B = len(labels)
    u, v = F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)
    k1, k2 = keys[:B], keys[B:]
    own = torch.eye(B, dtype=torch.bool, device=u.device)
    target = torch.arange(B, device=u.device)

    def direction(query, answer, k_query, k_answer):
        sim = scale * query @ answer.T  # (B queries, B candidates)
        not_negative = (k_answer[None, :] == k_query[:, None]) | (k_answer[None, :] == k_answer[:, None])
        not_negative |= (labels < 0)[None, :]
        # The pair's own answer always stays: every row keeps one finite entry.
        return F.cross_entropy(sim.masked_fill(not_negative & ~own, float("-inf")), target, reduction="none")

    per_pair = (direction(u, v, k1, k2) + direction(v, u, k2, k1)) / 2  # (B,)
    return torch.where(labels == 1, per_pair, 0.0).sum()


def online_contrastive_loss(u, v, labels, margin):
    """Contrastive loss over the batch's hard pairs only, summed: duplicates farther apart than the
    closest non-duplicate pull together (d^2), non-duplicates closer than the farthest duplicate
    push apart (max(0, margin - d)^2), d = 1 - cosine. Selected with masks, not indexing: the
    shapes stay fixed and nothing waits for the GPU."""
    d = 1 - F.cosine_similarity(u.float(), v.float(), dim=-1)  # (B,)
    pos, neg = labels == 1, labels == 0
    farthest_pos = torch.where(pos, d, -torch.inf).max()
    closest_neg = torch.where(neg, d, torch.inf).min()
    hard_pos = pos & (d > closest_neg)
    hard_neg = neg & (d < farthest_pos)
    return (torch.where(hard_pos, d.pow(2), 0.0) + torch.where(hard_neg, F.relu(margin - d).pow(2), 0.0)).sum()
