"""LL-R and LL-Ct (Kim et al. 2022, github.com/snucml/LargeLossMatters losses.py compute_batch_loss).

The rule, re-implemented below with plain loops over the label entries: unobserved labels are assumed
negative (AN loss nl(1 - p), observed positives nl(p), nl(x) = -log(x + 1e-5)); in epoch e (0-based) the
k = ceil(B * L * e * delta) largest AN losses among the unobserved labels (every one at or above the
k-th largest) are dropped (LL-R) or replaced by nl(p) (LL-Ct); the loss is the mean over all B * L.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from pml_dist import config
from pml_dist.errors import ConfigError
from pml_dist.training.losses import LargeLossLoss, LossParams, build_loss, large_loss_count

# 2 images x 3 classes, probabilities chosen so that the AN losses are distinct and easy to rank.
P = [[0.7, 0.9, 0.2], [0.6, 0.3, 0.8]]
T = [[1, 0, 0], [0, 0, 1]]  # one observed positive per image: (0, 0) and (1, 2)


def nl(x: float) -> float:
    return -math.log(x + 1e-5)


def logits_of(probs) -> torch.Tensor:
    return torch.logit(torch.tensor(probs, dtype=torch.float64)).float()


def by_hand(probs, targets, epoch: int, delta: float, correct: bool) -> tuple[float, set]:
    """The loss and the set of modified entries, from the definition, one entry at a time."""
    rows, cols = len(probs), len(probs[0])
    an = {}
    for b in range(rows):
        for c in range(cols):
            p = probs[b][c]
            an[b, c] = nl(p) if targets[b][c] == 1 else nl(1.0 - p)
    unobserved = [(b, c) for (b, c) in an if targets[b][c] == 0]
    k = math.ceil(Fraction(rows * cols) * Fraction(str(delta)) * epoch)  # exact arithmetic
    selected = set()
    if k > 0:
        ranked = sorted((an[e] for e in unobserved), reverse=True)
        threshold = ranked[min(k, len(ranked)) - 1]
        selected = {e for e in unobserved if an[e] >= threshold}
    total = 0.0
    for (b, c), value in an.items():
        if (b, c) in selected:
            total += nl(probs[b][c]) if correct else 0.0
        else:
            total += value
    return total / (rows * cols), selected


def module(name: str, epoch: int, delta: float, num_classes: int = 3) -> LargeLossLoss:
    loss = build_loss(name, num_classes, num_train=4, params=LossParams(ll_delta_rel=delta))
    loss.set_epoch(epoch)
    return loss


def value(name: str, epoch: int, delta: float, probs=P, targets=T) -> float:
    loss = module(name, epoch, delta, len(probs[0]))
    return float(loss(logits_of(probs), torch.tensor(targets, dtype=torch.float32)))


# ------------------------------------------------------------------------------ hand-written numbers


def test_epoch_one_by_hand_written_numbers():
    # AN losses (nl(x) = -log(x + 1e-5)):
    #   observed  (0,0) p=0.7: nl(0.7) = 0.356661     (1,2) p=0.8: nl(0.8) = 0.223131
    #   unobserved (0,1) p=0.9: nl(0.1) = 2.302485    (0,2) p=0.2: nl(0.8) = 0.223131
    #              (1,0) p=0.6: nl(0.4) = 0.916266    (1,1) p=0.3: nl(0.7) = 0.356661
    # AN = (0.356661 + 0.223131 + 2.302485 + 0.223131 + 0.916266 + 0.356661) / 6 = 4.378334 / 6 = 0.729722
    # epoch 1, delta 0.2: k = ceil(6 * 0.2) = ceil(1.2) = 2 -> (0,1) and (1,0) (threshold 0.916266)
    # LL-R  = (0.356661 + 0.223131 + 0.223131 + 0.356661) / 6 = 1.159584 / 6 = 0.193264
    # LL-Ct = (1.159584 + nl(0.9) + nl(0.6)) / 6 = (1.159584 + 0.105349 + 0.510809) / 6 = 1.775742 / 6
    #       = 0.295957
    assert value("ll_r", 0, 0.2) == pytest.approx(0.729722, abs=1e-6)
    assert value("ll_ct", 0, 0.2) == pytest.approx(0.729722, abs=1e-6)
    assert value("ll_r", 1, 0.2) == pytest.approx(0.193264, abs=1e-6)
    assert value("ll_ct", 1, 0.2) == pytest.approx(0.295957, abs=1e-6)
    assert by_hand(P, T, 1, 0.2, correct=False)[1] == {(0, 1), (1, 0)}


def test_epoch_two_leaves_the_observed_positive_with_the_same_loss_alone():
    # epoch 2, delta 0.2: k = ceil(6 * 0.4) = ceil(2.4) = 3 -> (0,1), (1,0), (1,1); threshold
    # nl(0.7) = 0.356661, which is also the loss of the observed positive (0,0): it stays.
    # LL-R = (0.356661 + 0.223131 + 0.223131) / 6 = 0.802923 / 6 = 0.133821
    assert value("ll_r", 2, 0.2) == pytest.approx(0.133821, abs=1e-6)
    assert by_hand(P, T, 2, 0.2, correct=False)[1] == {(0, 1), (1, 0), (1, 1)}


# --------------------------------------------------------------------- against the loop implementation


@pytest.mark.parametrize("name", ["ll_r", "ll_ct"])
@pytest.mark.parametrize("epoch", range(7))
def test_tiny_batch_matches_the_definition(name, epoch):
    expected, _ = by_hand(P, T, epoch, 0.2, correct=name == "ll_ct")
    assert value(name, epoch, 0.2) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_match_the_definition(seed):
    rng = random.Random(seed)
    rows, cols = 4, 5
    probs = [[rng.uniform(0.02, 0.98) for _ in range(cols)] for _ in range(rows)]
    targets = [[0] * cols for _ in range(rows)]
    for b in range(rows):
        targets[b][rng.randrange(cols)] = 1
    delta = rng.choice([0.05, 0.1, 0.15])
    for epoch in range(8):
        for name in ("ll_r", "ll_ct"):
            expected, _ = by_hand(probs, targets, epoch, delta, correct=name == "ll_ct")
            assert value(name, epoch, delta, probs, targets) == pytest.approx(expected, abs=1e-6)


def test_epoch_zero_is_an():
    logits, targets = logits_of(P), torch.tensor(T, dtype=torch.float32)
    an = float(build_loss("an", 3, 4)(logits, targets))
    for name in ("ll_r", "ll_ct"):
        assert float(module(name, 0, 0.2)(logits, targets)) == an
    # a zero delta keeps every epoch AN
    assert float(module("ll_r", 9, 0.0)(logits, targets)) == an


def test_the_rate_rises_with_the_epoch():
    counts = [len(by_hand(P, T, e, 0.1, correct=False)[1]) for e in range(8)]
    # k = ceil(6 * 0.1 e) = ceil(0.6 e): 0, 1, 2, 2, 3, 3, 4, then 5, capped at the 4 unobserved labels
    assert counts == [0, 1, 2, 2, 3, 3, 4, 4]
    assert [module("ll_r", e, 0.1).rate for e in (0, 1, 3)] == pytest.approx([0.0, 0.1, 0.3])
    rejected = [value("ll_r", e, 0.1) for e in range(8)]
    for e in range(1, 8):  # each further rejection lowers LL-R; the same count gives the same loss
        assert rejected[e] < rejected[e - 1] if counts[e] > counts[e - 1] else rejected[e] == rejected[e - 1]


def test_rate_is_capped_and_count_free_of_float_noise():
    assert module("ll_r", 30, 0.5).rate == 1.0
    assert large_loss_count(10, 3 * 0.1) == 3  # 3 * 0.1 * 10 = 3.0000000000000004 in floats
    assert large_loss_count(6, 0.0) == 0
    assert large_loss_count(6, 1e-6) == 1  # any positive rate modifies at least one entry, as ceil does
    assert large_loss_count(6, 5.0) == 6


def test_ll_r_and_ll_ct_differ_exactly_on_the_rejected_entries():
    targets = torch.tensor(T, dtype=torch.float32)
    for epoch in range(5):
        _, selected = by_hand(P, T, epoch, 0.2, correct=False)
        grads = {}
        for name in ("ll_r", "ll_ct", "an"):
            logits = logits_of(P).requires_grad_(True)
            loss = module(name, epoch, 0.2) if name != "an" else build_loss("an", 3, 4)
            loss(logits, targets).backward()
            grads[name] = logits.grad
        gap = value("ll_ct", epoch, 0.2) - value("ll_r", epoch, 0.2)
        assert gap == pytest.approx(sum(nl(P[b][c]) for b, c in selected) / 6, abs=1e-6)
        for b in range(2):
            for c in range(3):
                r, ct, an = grads["ll_r"][b, c], grads["ll_ct"][b, c], grads["an"][b, c]
                if (b, c) in selected:
                    assert r == 0.0  # rejected: no gradient
                    # corrected: d/dz [-log(p + 1e-5)] / 6 = -p (1 - p) / (p + 1e-5) / 6, pushes p up
                    p = P[b][c]
                    assert float(ct) == pytest.approx(-p * (1 - p) / (p + 1e-5) / 6, rel=1e-4)
                else:
                    assert r == ct == an


def test_observed_positives_are_never_rejected():
    # the observed positive (0, 0) has by far the largest loss (p = 0.01): still kept at every rate,
    # also once k exceeds the 4 unobserved entries (epoch 4: k = ceil(6 * 0.8) = 5)
    probs = [[0.01, 0.9, 0.2], [0.6, 0.3, 0.8]]
    for epoch in range(6):
        _, selected = by_hand(probs, T, epoch, 0.2, correct=False)
        assert (0, 0) not in selected and (1, 2) not in selected
        for name in ("ll_r", "ll_ct"):
            got = value(name, epoch, 0.2, probs)
            assert got == pytest.approx(by_hand(probs, T, epoch, 0.2, correct=name == "ll_ct")[0], abs=1e-6)
            assert got >= nl(0.01) / 6  # the positive's term is in the mean
    everything = value("ll_r", 5, 0.2, probs)  # every unobserved label rejected
    assert everything == pytest.approx((nl(0.01) + nl(0.8)) / 6, abs=1e-6)


def test_saturated_logits_stay_finite_after_warm_up():
    for name in ("ll_r", "ll_ct"):
        logits = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 50.0]], requires_grad=True)
        out = module(name, 5, 0.2)(logits, torch.tensor(T, dtype=torch.float32))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------- build path, state and config


@pytest.mark.parametrize("name", ["ll_r", "ll_ct"])
def test_build_loss_and_resume(name):
    loss = build_loss(name, 3, 4)
    assert isinstance(loss, LargeLossLoss) and loss.name == name and not loss.needs_index
    assert loss.params.ll_delta_rel == config.LossSection().ll_delta_rel == 0.002
    assert dict(loss.state_dict()) == {}  # nothing to checkpoint: the epoch comes from set_epoch
    logits, targets = logits_of(P), torch.tensor(T, dtype=torch.float32)
    trained = module(name, 0, 0.2)
    for epoch in range(4):
        trained.set_epoch(epoch)
        first = trained(logits, targets)
    resumed = module(name, 3, 0.2)
    assert torch.equal(resumed(logits, targets), first)
    assert torch.equal(resumed(logits, targets), first)  # deterministic


def test_large_loss_is_per_batch():
    # the selection is made inside the batch it is given (each rank's micro-batch), as in the reference
    targets = torch.tensor(T, dtype=torch.float32)
    loss = module("ll_r", 1, 0.2)
    whole = float(loss(logits_of(P), targets))
    halves = [float(loss(logits_of([row]), targets[i:i + 1])) for i, row in enumerate(P)]
    # k = ceil(3 * 0.2) = 1 per half: (0,1) in image 0 and (1,0) in image 1, as for the whole batch here
    assert sum(halves) / 2 == pytest.approx(whole, abs=1e-6)


def test_delta_is_validated():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ll_delta_rel must be in"):
            LossParams(ll_delta_rel=bad)
        with pytest.raises(ConfigError, match=r"'loss.ll_delta_rel' must be in \[0, 1\)"):
            config.load_config(None, [f"loss.ll_delta_rel={bad}"])
    cfg = config.load_config(None, ["loss.name=ll_ct", "loss.ll_delta_rel=0.004"])
    assert cfg.loss.name == "ll_ct" and cfg.loss.ll_delta_rel == 0.004
    assert {"ll_r", "ll_ct"} <= set(config.LOSSES)
    with pytest.raises(ValueError, match="'ll_r' or 'll_ct'"):
        LargeLossLoss("an", 3, 4, LossParams())


def test_labels():
    from pml_dist.pipeline.names import loss_label

    assert loss_label("ll_r") == "LL-R" and loss_label("ll_ct") == "LL-Ct"
