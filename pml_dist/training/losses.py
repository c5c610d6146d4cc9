"""Single-positive multi-label (SPML) losses, ported formula for formula from the published code.

Sources (read from the authors' repositories):
  [Cole21] Cole et al., "Multi-Label Learning from Single Positive Labels", CVPR 2021,
           github.com/elijahcole/single-positive-multi-label, losses.py (loss_bce, loss_an, loss_an_ls,
           loss_wan, loss_epr, loss_role, expected_positive_regularizer, compute_batch_loss), models.py
           (LabelEstimator: ROLE's label matrix and its initialisation), train.py (hyper-parameters).
  [Zhou22] Zhou et al., "Acknowledging the Unknown for Multi-label Learning with Single Positive Labels",
           ECCV 2022, github.com/Correr-Zhou/SPML-AckTheUnknown, losses.py (loss_EM, loss_EM_APL),
           train.py (aysmmetric_pseudo_labeling and the per-data-set hyper-parameters).
  [Kim22]  Kim et al., "Large Loss Matters in Weakly Supervised Multi-Label Classification", CVPR 2022,
           github.com/snucml/LargeLossMatters, losses.py (compute_batch_loss: LL-R, LL-Ct), train.py
           (clean_rate -= delta_rel after every epoch), config.py (delta_rel given in percent, / 100).

Conventions shared by every loss, as in the [Cole21] and [Zhou22] references ([Kim22]: see LargeLossLoss):
  * p = sigmoid(logits); neg_log(x) = -log(x + 1e-5) (the references' LOG_EPSILON clamp, copied as is: it
    bounds every term by -log(1e-5) ~ 11.5, so saturated sigmoids give finite values and gradients);
  * the loss matrix is summed and divided by B * L (compute_batch_loss), i.e. a mean over all entries,
    and a regulariser, where there is one, is added on top;
  * targets are 1 for the observed positive and 0 for unobserved labels. Where the references index with
    boolean masks (loss_mtx[obs == 1] = ...), we multiply by t and (1 - t): identical for 0/1 targets,
    free of host synchronisation, and it makes 'bce' accept soft targets in [0, 1].
The loss is computed in float32 whatever the logits' dtype, so bf16/fp16 training matches the references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pml_dist.config import LOSSES, apl_schedule_fits

LOG_EPSILON = 1e-5  # [Cole21] and [Zhou22] losses.py

# [Cole21] models.py LabelEstimator: unobserved entries start uniform in logit(0.5 -+ 0.1), observed
# positives at logit(0.995) (observed negatives, absent in SPML, would start at logit(0.005)).
ROLE_INIT_HALF_WIDTH = 0.1
ROLE_INIT_POSITIVE = 0.995


@dataclass
class LossParams:
    """Hyper-parameters with their published COCO values."""

    ls_eps: float = 0.1  # AN-LS label-smoothing coefficient, [Cole21] train.py P['ls_coef']
    expected_positives: float = 2.9  # EPR / ROLE k for COCO, [Cole21] train.py lookup['expected_num_pos']
    role_lr_mult: float = 10.0  # ROLE label-matrix LR multiplier, [Cole21] train.py P['lr_mult']
    em_alpha: float = 0.1  # EM weight of the unobserved-entropy term, COCO, [Zhou22] train.py P['alpha']
    apl_beta: float = 0.9  # APL weight of the pseudo-label BCE term, COCO, [Zhou22] P['beta']
    apl_neg_proportion: float = 0.9  # share of unobserved labels pseudo-labelled in all, [Zhou22]
    apl_warmup_epochs: int = 5  # pseudo-label after 1-based epoch e >= this, COCO, [Zhou22] P['warmup_epoch']
    apl_num_epochs: int = 10  # the schedule spreads the quota over (num_epochs - warmup), [Zhou22]
    # LL-R / LL-Ct: rise of the per-batch share of modified labels per epoch, [Kim22] P['delta_rel'] (a
    # required argument there, given in percent; its README's grid is 0.1 ... 0.5 %): 0.2 % per epoch.
    ll_delta_rel: float = 0.002

    def __post_init__(self) -> None:
        if not 0.0 <= self.ls_eps <= 1.0:
            raise ValueError(f"ls_eps must be in [0, 1], got {self.ls_eps}")
        if self.expected_positives < 0:
            raise ValueError(f"expected_positives must be >= 0, got {self.expected_positives}")
        if self.role_lr_mult <= 0:
            raise ValueError(f"role_lr_mult must be > 0, got {self.role_lr_mult}")
        if self.em_alpha < 0 or self.apl_beta < 0:
            raise ValueError(f"em_alpha and apl_beta must be >= 0, got {self.em_alpha}, {self.apl_beta}")
        if not 0.0 <= self.apl_neg_proportion <= 1.0:
            raise ValueError(f"apl_neg_proportion must be in [0, 1], got {self.apl_neg_proportion}")
        if not 0.0 <= self.ll_delta_rel < 1.0:
            raise ValueError(f"ll_delta_rel must be in [0, 1), got {self.ll_delta_rel}")
        # apl_warmup_epochs / apl_num_epochs are checked by EmAplLoss, the one loss with a schedule:
        # every other loss ignores them, so a short run may build it with any values.


# ------------------------------------------------------------------------------------------ helpers


def neg_log(x: torch.Tensor) -> torch.Tensor:
    """-log(x + 1e-5): the epsilon clamp of [Cole21]/[Zhou22] losses.py, copied rather than logsigmoid."""
    return -torch.log(x + LOG_EPSILON)


def inverse_sigmoid(p: float) -> float:
    """logit(p) with p clipped to [1e-5, 1 - 1e-5], as [Cole21] models.py inverse_sigmoid."""
    p = min(max(p, 1e-5), 1 - 1e-5)
    return math.log(p / (1 - p))


def expected_positive_regularizer(preds: torch.Tensor, expected_num_pos: float) -> torch.Tensor:
    """(mean_b sum_l p_bl - k)^2, the norm='2' case of [Cole21] losses.py expected_positive_regularizer."""
    return (preds.sum(1).mean(0) - expected_num_pos) ** 2


def _bce_matrix(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """t neg_log(p) + (1 - t) neg_log(1 - p), elementwise; t may be soft."""
    return targets * neg_log(preds) + (1.0 - targets) * neg_log(1.0 - preds)


def _neg_entropy_matrix(preds: torch.Tensor) -> torch.Tensor:
    """-H(p) = -(p neg_log(p) + (1 - p) neg_log(1 - p)), elementwise ([Zhou22] loss_EM)."""
    return -(preds * neg_log(preds) + (1.0 - preds) * neg_log(1.0 - preds))


# ----------------------------------------------------------------------------- the loss functions
# Each takes probabilities p (B, L) and float targets t (B, L) and returns the scalar batch loss.


def loss_bce(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # mean[t nl(p) + (1-t) nl(1-p)], t full/pseudo labels, hard or soft. [Cole21] losses.py loss_bce
    return _bce_matrix(p, t).mean()


def loss_an(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # mean[t nl(p) + (1-t) nl(1-p)], unobserved assumed negative. [Cole21] losses.py loss_an
    return _bce_matrix(p, t).mean()


def loss_an_ls(p: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    # mean[t((1-e)nl(p) + e nl(1-p)) + (1-t)((1-e)nl(1-p) + e nl(p))]. [Cole21] losses.py loss_an_ls
    pos = (1.0 - eps) * neg_log(p) + eps * neg_log(1.0 - p)
    neg = (1.0 - eps) * neg_log(1.0 - p) + eps * neg_log(p)
    return (t * pos + (1.0 - t) * neg).mean()


def loss_wan(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # mean[t nl(p) + (1-t) nl(1-p) / (L-1)]. [Cole21] losses.py loss_wan
    num_classes = p.shape[1]
    return (t * neg_log(p) + (1.0 - t) * neg_log(1.0 - p) / float(num_classes - 1)).mean()


def loss_epr(p: torch.Tensor, t: torch.Tensor, k: float) -> torch.Tensor:
    # mean[t nl(p)] + (mean_b sum_l p - k)^2 / L^2. [Cole21] losses.py loss_epr
    num_classes = p.shape[1]
    return (t * neg_log(p)).mean() + expected_positive_regularizer(p, k) / num_classes**2


def loss_em(p: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    # mean[t nl(p) - alpha (1-t) H(p)], H(p) = p nl(p) + (1-p) nl(1-p). [Zhou22] losses.py loss_EM
    return (t * neg_log(p) + (1.0 - t) * alpha * _neg_entropy_matrix(p)).mean()


def loss_em_apl(p: torch.Tensor, t: torch.Tensor, pseudo: torch.Tensor, alpha: float,
                beta: float) -> torch.Tensor:
    # mean[t nl(p) - alpha u H(p) + beta m (s nl(p) + (1-s) nl(1-p))], m = pseudo-labelled (soft
    # negative s = pseudo), u = 1 - t - m. [Zhou22] losses.py loss_EM_APL (label_matrix_obs = -s there)
    m = (~torch.isnan(pseudo)).to(p.dtype) * (1.0 - t)  # pseudo labels only ever sit on unobserved labels
    s = torch.nan_to_num(pseudo, nan=0.0)
    unknown = (1.0 - t) * (1.0 - m)
    return (t * neg_log(p) + unknown * alpha * _neg_entropy_matrix(p) + m * beta * _bce_matrix(p, s)).mean()


def loss_role(p: torch.Tensor, t: torch.Tensor, est: torch.Tensor, k: float) -> torch.Tensor:
    # [Cole21] losses.py loss_role: with q = est (label estimator rows), R(x) = (mean_b sum_l x - k)^2 / L^2,
    # mean[0.5 (t nl(p) + t nl(q)) + 0.5 (bce(p; q.detach) + bce(q; p.detach))] + 0.5 (R(p) + R(q))
    num_classes = p.shape[1]
    pos = t * neg_log(p) + t * neg_log(est)
    cross = _bce_matrix(p, est.detach()) + _bce_matrix(est, p.detach())
    reg = expected_positive_regularizer(p, k) + expected_positive_regularizer(est, k)
    return (0.5 * (pos + cross)).mean() + 0.5 * reg / num_classes**2


def large_loss_count(num_entries: int, rate: float) -> int:
    """k = ceil(B * L * rate), at most B * L: how many entries [Kim22] compute_batch_loss modifies.

    The product is rounded to 9 decimals first, so float noise cannot add an entry where B * L * rate
    is a whole number (the reference's rate, 1 - (1 - d - d - ...), can exceed e * d by an ulp there).
    """
    if rate <= 0.0:
        return 0
    return min(num_entries, math.ceil(round(num_entries * rate, 9)))


def large_loss_mask(an_matrix: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """(B, L) bool: the unobserved entries whose AN loss is >= the k-th largest unobserved AN loss.

    As [Kim22] compute_batch_loss: torch.topk over the flattened batch, threshold = the k-th value,
    every entry at or above it selected (ties included, so a few more than k may be). Observed
    positives are filled with -inf before the topk and masked out after it (the reference fills them
    with 0 and does not mask: the same selection whenever the threshold is > 0; it differs only where
    k exceeds the unobserved entries with a positive loss, where the reference would also modify the
    observed positives).
    """
    unobserved = t == 0
    if k == 0:
        return torch.zeros_like(unobserved)
    losses = an_matrix.detach()
    threshold = torch.topk(losses.masked_fill(~unobserved, float("-inf")).flatten(), k).values[-1]
    return unobserved & (losses >= threshold)


def loss_large_loss(p: torch.Tensor, t: torch.Tensor, rate: float, correct: bool) -> torch.Tensor:
    # [Kim22] losses.py compute_batch_loss: with l = AN matrix t nl(p) + (1-t) nl(1-p) and S = the
    # large-loss entries (large_loss_mask, k = ceil(B L rate)), mean[l off S; on S 0 (LL-R) or nl(p) (LL-Ct)]
    an = _bce_matrix(p, t)
    selected = large_loss_mask(an, t, large_loss_count(an.numel(), rate))
    replacement = neg_log(p) if correct else torch.zeros_like(an)
    return torch.where(selected, replacement, an).mean()


# ----------------------------------------------------------------------------------- the modules


class SPMLLoss(nn.Module):
    """forward(logits (B, L), targets (B, L), index (B,) long) -> scalar loss.

    `targets` are the observed single positives (1) and unobserved labels (0) for the SPML losses, full
    or pseudo labels (hard 0/1 or soft probabilities in [0, 1]) for 'bce'. `index` is each sample's row
    in the training split; only 'role' and 'em_apl' read it. Target values are not checked on the hot
    path (that would synchronise with the GPU every step); shapes are.
    """

    needs_index = False

    def __init__(self, name: str, num_classes: int, num_train: int, params: LossParams) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.num_train = num_train
        self.params = params
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Record the 0-based epoch about to be trained (EM+APL's and LL-R/LL-Ct's schedules read it)."""
        self.epoch = int(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                index: torch.Tensor | None = None) -> torch.Tensor:
        self._check(logits, targets, index)
        preds = torch.sigmoid(logits.float())
        return self._loss(preds, targets.to(torch.float32), index)

    def _loss(self, p: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        params = self.params
        if self.name in ("bce", "an"):
            return loss_bce(p, t) if self.name == "bce" else loss_an(p, t)
        if self.name == "an_ls":
            return loss_an_ls(p, t, params.ls_eps)
        if self.name == "wan":
            return loss_wan(p, t)
        if self.name == "epr":
            return loss_epr(p, t, params.expected_positives)
        if self.name == "em":
            return loss_em(p, t, params.em_alpha)
        raise AssertionError(f"no loss body for {self.name!r}")  # subclasses handle role and em_apl

    def _check(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor | None) -> None:
        if logits.dim() != 2:
            raise ValueError(f"{self.name}: logits must be (batch, classes), got shape {tuple(logits.shape)}")
        if targets.shape != logits.shape:
            raise ValueError(f"{self.name}: targets shape {tuple(targets.shape)} must equal logits shape "
                             f"{tuple(logits.shape)}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"{self.name}: logits have {logits.shape[1]} classes, the loss was built for "
                             f"{self.num_classes}")
        if not self.needs_index:
            return
        if index is None:
            raise ValueError(f"{self.name}: needs `index`, the samples' rows in the training split")
        if index.shape != (logits.shape[0],) or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"{self.name}: index must be an integer tensor of shape ({logits.shape[0]},), "
                             f"got {index.dtype} {tuple(index.shape)}")


class RoleLoss(SPMLLoss):
    """ROLE [Cole21]: jointly learns an N x L label-estimate matrix, kept here as a Parameter.

    The matrix holds logits; est = sigmoid(label_logits[index]). Keeping it in the module lets the
    optimizer (with `param_groups_lr_mult`) and data-parallel gradient averaging treat it like weights.
    """

    needs_index = True

    def __init__(self, num_classes: int, num_train: int, params: LossParams, observed_labels: torch.Tensor,
                 seed: int) -> None:
        super().__init__("role", num_classes, num_train, params)
        self.label_logits = nn.Parameter(role_initial_logits(observed_labels, seed))

    def _loss(self, p: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        est = torch.sigmoid(self.label_logits[index].float())
        return loss_role(p, t, est, self.params.expected_positives)


def role_initial_logits(observed_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """[Cole21] models.py LabelEstimator init: U(-q, q) with q = logit(0.6), observed positives logit(0.995).

    Drawn from a private generator seeded with `seed` (the reference used the global torch RNG), so
    every rank builds the same matrix without touching the global random state.
    """
    n, num_classes = observed_labels.shape
    generator = torch.Generator().manual_seed(seed)
    q = inverse_sigmoid(0.5 + ROLE_INIT_HALF_WIDTH)
    logits = q * (2 * torch.rand(n, num_classes, generator=generator) - 1)
    logits[observed_labels.bool()] = inverse_sigmoid(ROLE_INIT_POSITIVE)
    return logits


class EmAplLoss(SPMLLoss):
    """EM + asymmetric pseudo-labelling [Zhou22].

    Before any pseudo label exists this is exactly EM. After each training epoch e (1-based) with
    e >= apl_warmup_epochs, the trainer runs the model over the training split and calls
    `update_pseudo_labels(probs, index)`; per class, the int(neg_proportion * U_c / (num_epochs - warmup))
    unobserved, not yet pseudo-labelled samples with the lowest predicted probability get that
    probability as a soft negative label (U_c: unobserved count of class c in the whole split), which
    later batches fit with weight beta instead of the entropy term.

    The pseudo-label matrix (NaN = none) is not a buffer, so DDP does not broadcast N x L floats every
    step; every rank must call `update_pseudo_labels` with the same gathered predictions (the selection
    is deterministic). It is saved in the state_dict through get_extra_state/set_extra_state.
    """

    needs_index = True

    def __init__(self, num_classes: int, num_train: int, params: LossParams,
                 observed_labels: torch.Tensor) -> None:
        super().__init__("em_apl", num_classes, num_train, params)
        if not apl_schedule_fits(params.apl_warmup_epochs, params.apl_num_epochs):
            raise ValueError("em_apl: need 1 <= apl_warmup_epochs < apl_num_epochs, got "
                             f"{params.apl_warmup_epochs} and {params.apl_num_epochs}")
        self._observed = observed_labels.bool().cpu()
        self._unobserved_count = (~self._observed).sum(0)  # U_c: [Zhou22] P['unlabel_num']
        self._pseudo = torch.full((num_train, num_classes), float("nan"))  # on CPU; the source of truth
        self._pseudo_on_device: torch.Tensor | None = None  # cached copy where the logits live
        self.num_pseudo_labels = 0

    @property
    def pseudo_labels(self) -> torch.Tensor:
        """(N, L) float32 on CPU: soft negative pseudo label per entry, NaN where there is none."""
        return self._pseudo

    @property
    def pseudo_labels_due(self) -> bool:
        """True after the training pass of 1-based epoch epoch + 1 >= warmup ([Zhou22] train.py train())."""
        return self.epoch + 1 >= self.params.apl_warmup_epochs

    def per_round_quota(self) -> torch.Tensor:
        """int(neg_proportion * U_c / (num_epochs - warmup_epoch)) per class, [Zhou22] neg_PL_num."""
        rounds = self.params.apl_num_epochs - self.params.apl_warmup_epochs
        return (self.params.apl_neg_proportion * self._unobserved_count.double() / rounds).floor().long()

    @torch.no_grad()
    def update_pseudo_labels(self, probs: torch.Tensor, index: torch.Tensor) -> int:
        """Pseudo-label the lowest-scored unobserved labels; returns how many were added (0 if not due).

        probs: (M, L) sigmoid outputs on training samples `index` (M,), gathered over all ranks.
        """
        if probs.dim() != 2 or probs.shape[1] != self.num_classes or index.shape != (probs.shape[0],):
            raise ValueError(f"em_apl: probs must be (M, {self.num_classes}) with index (M,), got "
                             f"{tuple(probs.shape)} and {tuple(index.shape)}")
        if not self.pseudo_labels_due:
            return 0
        rows, row_probs = _first_occurrence(index.cpu().long(), probs.detach().cpu().float(), self.num_train)
        added = 0
        for c, quota in enumerate(self.per_round_quota().tolist()):
            free = ~self._observed[rows, c] & torch.isnan(self._pseudo[rows, c])
            cand_rows, cand_probs = rows[free], row_probs[free, c]
            # ascending and stable, so equal probabilities are broken by row order on every rank alike
            pick = torch.argsort(cand_probs, stable=True)[:quota]
            self._pseudo[cand_rows[pick], c] = cand_probs[pick]
            added += int(pick.numel())
        self.num_pseudo_labels += added
        self._pseudo_on_device = None
        return added

    def _loss(self, p: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.num_pseudo_labels == 0:  # warm-up: exactly EM, without the lookup
            return loss_em(p, t, self.params.em_alpha)
        if self._pseudo_on_device is None or self._pseudo_on_device.device != p.device:
            self._pseudo_on_device = self._pseudo.to(p.device)
        pseudo = self._pseudo_on_device[index]
        return loss_em_apl(p, t, pseudo, self.params.em_alpha, self.params.apl_beta)

    def get_extra_state(self) -> dict[str, Any]:
        return {"pseudo": self._pseudo.clone(), "num_pseudo_labels": self.num_pseudo_labels,
                "epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pseudo = state["pseudo"].cpu().float()
        if pseudo.shape != self._pseudo.shape:
            raise ValueError(f"em_apl: saved pseudo labels have shape {tuple(pseudo.shape)}, expected "
                             f"{tuple(self._pseudo.shape)}")
        self._pseudo = pseudo
        self.num_pseudo_labels = int(state["num_pseudo_labels"])
        self.epoch = int(state["epoch"])
        self._pseudo_on_device = None


def _first_occurrence(index: torch.Tensor, probs: torch.Tensor, num_train: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique rows (ascending) and the probs of their first occurrence.

    A DistributedSampler pads the last batch with repeated samples; without this one image could be
    pseudo-labelled twice in a round, or differently on different ranks.
    """
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_train):
        raise ValueError(f"em_apl: index values must be in [0, {num_train}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    positions = torch.arange(index.numel())
    first = torch.full((num_train,), index.numel(), dtype=torch.long)
    first.scatter_reduce_(0, index, positions, reduce="amin")
    rows = torch.nonzero(first < index.numel()).squeeze(1)
    return rows, probs[first[rows]]


class LargeLossLoss(SPMLLoss):
    """LL-R ('ll_r', reject) and LL-Ct ('ll_ct', temporary correction) [Kim22].

    AN, except that in every batch the unobserved labels with the largest AN losses are modified: their
    loss is dropped (LL-R) or replaced by the loss of a positive label, -log p (LL-Ct), for this step
    only. The share modified is rate = epoch * ll_delta_rel of all B * L entries, `epoch` as the trainer
    passes it to set_epoch (0-based): the reference starts at clean_rate = 1 (plain AN in its epoch 1)
    and subtracts delta_rel after each epoch. The mean is over all B * L entries, rejected ones counting
    as 0, as the reference's final_loss_matrix.mean(). See large_loss_mask for the selection.

    The only state is the epoch, set by the trainer before every epoch (resume included), so nothing is
    checkpointed. Each rank selects within its own micro-batch, as the reference does within its batch
    (16 images); LinearInit's head-only epochs count in `epoch` (the reference trains end to end only).
    Permanent correction (the reference's LL-Cp, which rewrites the label matrix) is not provided.
    The AN and corrected terms use this module's nl = -log(x + 1e-5), like every loss here, where [Kim22]
    calls binary_cross_entropy_with_logits (no clamp): they differ by log(1 + 1e-5 / x), noticeably only
    where x = p or 1 - p nears 1e-5 (the clamp bounds each term by ~11.5).
    """

    def __init__(self, name: str, num_classes: int, num_train: int, params: LossParams) -> None:
        if name not in ("ll_r", "ll_ct"):
            raise ValueError(f"LargeLossLoss is 'll_r' or 'll_ct', got {name!r}")
        super().__init__(name, num_classes, num_train, params)

    @property
    def rate(self) -> float:
        """Share of the batch's B * L entries modified in this epoch: epoch * ll_delta_rel, at most 1."""
        return min(1.0, self.epoch * self.params.ll_delta_rel)

    def _loss(self, p: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return loss_large_loss(p, t, self.rate, correct=self.name == "ll_ct")


# ------------------------------------------------------------------------------------- factories

# Losses that keep a label state per training image and class, and its bytes per cell on every rank:
# ROLE's fp32 label logits with their gradient and Adam's two moments; EM+APL's fp32 pseudo labels,
# the observed matrix and its one-hot source. They are refused above DENSE_STATE_BUDGET per process
# (OpenImages' 600-class cut at 9M images would need 86 GB for ROLE), with the numbers.
DENSE_STATE_BYTES = {"role": 16, "em_apl": 6}
DENSE_STATE_BUDGET = 8 * 2**30


def dense_state_problem(name: str, num_train: int, num_classes: int) -> str | None:
    """Why loss `name` cannot keep its per-sample state for this split (None: it can)."""
    per_cell = DENSE_STATE_BYTES.get(name)
    if per_cell is None or num_train * num_classes * per_cell <= DENSE_STATE_BUDGET:
        return None
    others = ", ".join(n for n in LOSSES if n not in DENSE_STATE_BYTES and n != "bce")
    return (f"loss.name={name} keeps a label state per training image and class ({per_cell} bytes each on "
            f"every rank): {num_train:,} images x {num_classes:,} classes = "
            f"{num_train * num_classes * per_cell / 2**30:.1f} GiB, over its budget of "
            f"{DENSE_STATE_BUDGET / 2**30:.0f} GiB; at this size use a loss without one ({others})")


def build_loss(name: str, num_classes: int, num_train: int, params: LossParams | None = None, *,
               seed: int = 0, observed_labels: torch.Tensor | np.ndarray | None = None) -> SPMLLoss:
    """The loss module `name` (one of LOSSES).

    'role' and 'em_apl' need `observed_labels`, the (num_train, num_classes) 0/1 matrix of observed
    positives of the training split: ROLE initialises its label matrix from it, EM+APL counts the
    unobserved labels per class. `seed` fixes ROLE's initial label matrix (the same on every rank).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
    if num_classes < 1 or num_train < 1:
        raise ValueError(f"num_classes and num_train must be >= 1, got {num_classes} and {num_train}")
    if name == "wan" and num_classes < 2:
        raise ValueError("wan weights negatives by 1 / (L - 1): needs at least 2 classes")
    if problem := dense_state_problem(name, num_train, num_classes):
        raise ValueError(problem)
    params = params if params is not None else LossParams()
    if name == "role":
        observed = _observed_matrix(observed_labels, num_train, num_classes, name)
        return RoleLoss(num_classes, num_train, params, observed, seed)
    if name == "em_apl":
        observed = _observed_matrix(observed_labels, num_train, num_classes, name)
        return EmAplLoss(num_classes, num_train, params, observed)
    if name in ("ll_r", "ll_ct"):
        return LargeLossLoss(name, num_classes, num_train, params)
    return SPMLLoss(name, num_classes, num_train, params)


def _observed_matrix(observed: torch.Tensor | np.ndarray | None, num_train: int, num_classes: int,
                     name: str) -> torch.Tensor:
    if observed is None:
        raise ValueError(f"{name}: build_loss needs observed_labels, the (num_train, num_classes) 0/1 "
                         "matrix of observed positives")
    observed = torch.as_tensor(np.asarray(observed) if not isinstance(observed, torch.Tensor) else observed)
    if tuple(observed.shape) != (num_train, num_classes):
        raise ValueError(f"{name}: observed_labels shape {tuple(observed.shape)} must be "
                         f"({num_train}, {num_classes})")
    if not bool(((observed == 0) | (observed == 1)).all()):
        raise ValueError(f"{name}: observed_labels must hold only 0 (unobserved) and 1 (observed positive)")
    return observed.detach().cpu().bool()


def param_groups_lr_mult(loss: SPMLLoss) -> list[tuple[list[nn.Parameter], float]]:
    """Parameters of the loss that want their own LR: ROLE's label matrix at role_lr_mult x the base LR.

    [Cole21] train.py gives it lr_mult * lr in Adam without weight decay; keep it out of any weight-decay
    group. Every other loss has no parameters and returns [].
    """
    if isinstance(loss, RoleLoss):
        return [([loss.label_logits], loss.params.role_lr_mult)]
    return []
