"""Every loss against arithmetic written out here with plain `math`, on a 2 x 3 batch.

The expected values follow the published code (Cole et al. 2021 losses.py, Zhou et al. 2022 losses.py):
p = sigmoid(z), nl(x) = -log(x + 1e-5), loss matrix summed and divided by B * L, regulariser added.
"""

from __future__ import annotations

import math

import pytest
import torch

from pml_dist import config
from pml_dist.training.losses import LOSSES, LossParams, build_loss, param_groups_lr_mult

Z = [[0.5, -1.0, 2.0], [-0.3, 0.8, -2.0]]  # logits, batch of 2, 3 classes
T = [[1, 0, 0], [0, 0, 1]]  # one observed positive per image
B, L = 2, 3


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def nl(x: float) -> float:
    return -math.log(x + 1e-5)


P = [[sig(z) for z in row] for row in Z]


def entries():
    for b in range(B):
        for c in range(L):
            yield b, c, P[b][c], T[b][c]


def run(name: str, targets=T, params: LossParams | None = None, **kwargs) -> float:
    loss = build_loss(name, L, num_train=4, params=params, **kwargs)
    return float(loss(torch.tensor(Z), torch.tensor(targets, dtype=torch.float32), torch.tensor([2, 0])))


# ----------------------------------------------------------------------------------- plain losses


def test_bce_full_labels():
    full = [[1, 1, 0], [0, 1, 1]]
    expected = sum(nl(P[b][c]) if full[b][c] else nl(1 - P[b][c]) for b in range(B) for c in range(L)) / 6
    assert run("bce", full) == pytest.approx(expected, rel=1e-6)


def test_bce_soft_targets():
    soft = [[0.7, 0.1, 0.0], [0.25, 1.0, 0.5]]
    expected = sum(soft[b][c] * nl(P[b][c]) + (1 - soft[b][c]) * nl(1 - P[b][c])
                   for b in range(B) for c in range(L)) / 6
    assert run("bce", soft) == pytest.approx(expected, rel=1e-6)


def test_bce_accepts_uint8_targets():
    loss = build_loss("bce", L, 4)
    as_uint8 = loss(torch.tensor(Z), torch.tensor(T, dtype=torch.uint8))
    assert float(as_uint8) == pytest.approx(run("bce", T), rel=1e-7)


def test_an_is_bce_with_observed_labels_as_targets():
    expected = sum(nl(p) if t else nl(1 - p) for _, _, p, t in entries()) / 6
    assert run("an") == pytest.approx(expected, rel=1e-6)
    assert run("an") == pytest.approx(run("bce", T), rel=1e-7)


def test_wan_weights_assumed_negatives_by_one_over_l_minus_one():
    expected = sum(nl(p) if t else nl(1 - p) / (L - 1) for _, _, p, t in entries()) / 6
    assert run("wan") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_an_ls_smooths_both_sides(eps):
    expected = sum((1 - eps) * nl(p) + eps * nl(1 - p) if t else (1 - eps) * nl(1 - p) + eps * nl(p)
                   for _, _, p, t in entries()) / 6
    got = run("an_ls", params=LossParams(ls_eps=eps))
    assert got == pytest.approx(expected, rel=1e-6)
    assert LossParams().ls_eps == 0.1


def test_epr_positive_term_plus_regulariser():
    k = 2.9
    positive_term = sum(nl(p) for _, _, p, t in entries() if t) / 6
    mean_row_sum = (sum(P[0]) + sum(P[1])) / 2
    regulariser = (mean_row_sum - k) ** 2 / L**2
    assert run("epr") == pytest.approx(positive_term + regulariser, rel=1e-6)
    # with no observed positive only the regulariser is left
    assert run("epr", [[0] * 3, [0] * 3]) == pytest.approx(regulariser, rel=1e-6)
    assert run("epr", params=LossParams(expected_positives=1.0)) == pytest.approx(
        positive_term + (mean_row_sum - 1.0) ** 2 / 9, rel=1e-6)


def em_entry(p: float, t: int, alpha: float) -> float:
    return nl(p) if t else -alpha * (p * nl(p) + (1 - p) * nl(1 - p))


def test_em_positive_term_and_negative_entropy_on_unobserved():
    expected = sum(em_entry(p, t, 0.1) for _, _, p, t in entries()) / 6
    assert run("em") == pytest.approx(expected, rel=1e-6)
    expected_02 = sum(em_entry(p, t, 0.2) for _, _, p, t in entries()) / 6
    assert run("em", params=LossParams(em_alpha=0.2)) == pytest.approx(expected_02, rel=1e-6)


def test_em_gradient_pushes_unobserved_towards_one_half_and_positives_up():
    logits = torch.tensor(Z, requires_grad=True)
    build_loss("em", L, 4)(logits, torch.tensor(T, dtype=torch.float32)).backward()
    for b, c, p, t in entries():
        grad = float(logits.grad[b, c])
        if t:
            assert grad < 0  # descent raises the observed positive's probability
        else:
            assert math.copysign(1, grad) == math.copysign(1, p - 0.5)  # descent moves p towards 0.5


# ---------------------------------------------------------------------------------------- EM+APL

OBSERVED = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]  # 4 training images
# predicted probabilities on the whole training split, used for pseudo-labelling
PROBS = [[0.9, 0.2, 0.3], [0.4, 0.8, 0.1], [0.05, 0.6, 0.7], [0.7, 0.15, 0.25]]
# 1.0 of the unobserved labels over 4 - 2 = 2 rounds: int(U_c / 2) = 1 per class per round (U = 2, 3, 3)
APL = LossParams(apl_neg_proportion=1.0, apl_warmup_epochs=2, apl_num_epochs=4, apl_beta=0.9)


def em_apl_loss(params: LossParams = APL):
    return build_loss("em_apl", L, 4, params, observed_labels=torch.tensor(OBSERVED))


def pseudo_as_lists(loss) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(v, 6) for v in row] for row in loss.pseudo_labels.tolist()]


def test_em_apl_is_em_before_warm_up():
    loss, em = em_apl_loss(), build_loss("em", L, 4)
    targets = torch.tensor([OBSERVED[2], OBSERVED[1]], dtype=torch.float32)
    batch = (torch.tensor(Z), targets, torch.tensor([2, 1]))
    loss.set_epoch(0)  # 1-based epoch 1 < warm-up 2
    assert not loss.pseudo_labels_due
    assert loss.update_pseudo_labels(torch.tensor(PROBS), torch.arange(4)) == 0
    assert float(loss(*batch)) == float(em(*batch))


def test_em_apl_published_quota():
    loss = build_loss("em_apl", 2, 100, observed_labels=torch.zeros(100, 2))
    assert loss.params.apl_warmup_epochs == 5 and loss.params.apl_num_epochs == 10
    assert loss.per_round_quota().tolist() == [int(0.9 * 100 / (10 - 5))] * 2  # 18 per round


def test_em_apl_pseudo_labels_lowest_unobserved_per_class_after_warm_up():
    loss = em_apl_loss()
    loss.set_epoch(1)  # 1-based epoch 2 >= warm-up 2
    assert loss.update_pseudo_labels(torch.tensor(PROBS), torch.arange(4)) == 3
    # class 0: unobserved rows 1 (0.4), 2 (0.05) -> row 2; class 1: rows 0, 2, 3 -> row 3 (0.15);
    # class 2: rows 0, 1, 3 -> row 1 (0.1). The soft label is the predicted probability.
    assert pseudo_as_lists(loss) == [[None, None, None], [None, None, 0.1], [0.05, None, None],
                                     [None, 0.15, None]]
    # the next round picks among what is still unlabelled, never an observed positive
    loss.set_epoch(2)
    assert loss.update_pseudo_labels(torch.tensor(PROBS), torch.arange(4)) == 3
    assert pseudo_as_lists(loss) == [[None, 0.2, None], [0.4, None, 0.1], [0.05, None, None],
                                     [None, 0.15, 0.25]]


def test_em_apl_loss_applies_pseudo_labels_with_beta():
    loss = em_apl_loss()
    loss.set_epoch(1)
    loss.update_pseudo_labels(torch.tensor(PROBS), torch.arange(4))
    targets = [OBSERVED[2], OBSERVED[1]]  # batch rows are training images 2 and 1
    pseudo = {(0, 0): 0.05, (1, 2): 0.1}  # image 2 class 0, image 1 class 2
    alpha, beta = 0.1, 0.9
    total = 0.0
    for b in range(B):
        for c in range(L):
            p, t = P[b][c], targets[b][c]
            if (b, c) in pseudo:
                s = pseudo[(b, c)]
                total += beta * (s * nl(p) + (1 - s) * nl(1 - p))
            else:
                total += em_entry(p, t, alpha)
    got = loss(torch.tensor(Z), torch.tensor(targets, dtype=torch.float32), torch.tensor([2, 1]))
    assert float(got) == pytest.approx(total / 6, rel=1e-6)


def test_em_apl_first_occurrence_wins_for_repeated_indices():
    loss = em_apl_loss()
    loss.set_epoch(1)
    padded = torch.tensor(PROBS + [[0.01, 0.01, 0.01]])  # image 0 again (a sampler pad), other probs
    loss.update_pseudo_labels(padded, torch.tensor([0, 1, 2, 3, 0]))
    assert pseudo_as_lists(loss)[0] == [None, None, None]


def test_em_apl_pseudo_labels_survive_state_dict():
    loss = em_apl_loss()
    loss.set_epoch(1)
    loss.update_pseudo_labels(torch.tensor(PROBS), torch.arange(4))
    restored = em_apl_loss()
    restored.load_state_dict(loss.state_dict())
    assert pseudo_as_lists(restored) == pseudo_as_lists(loss)
    assert restored.num_pseudo_labels == 3 and restored.epoch == 1


# ------------------------------------------------------------------------------------------ ROLE


def role_loss(seed: int = 0, params: LossParams | None = None):
    return build_loss("role", L, 4, params, seed=seed, observed_labels=torch.tensor(OBSERVED))


def test_role_init_follows_the_published_label_estimator():
    loss = role_loss()
    init = loss.label_logits.detach()
    positive = torch.tensor(OBSERVED).bool()
    assert torch.allclose(init[positive], torch.tensor(math.log(0.995 / 0.005)))
    assert float(init[~positive].abs().max()) <= math.log(0.6 / 0.4)
    assert torch.equal(init, role_loss(seed=0).label_logits.detach())  # every rank starts the same
    assert not torch.equal(init, role_loss(seed=1).label_logits.detach())


def test_role_init_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    role_loss()
    assert torch.equal(torch.rand(3), expected)


def role_hand_value(q: list[list[float]], targets: list[list[int]], k: float) -> float:
    total = 0.0
    for b, c, p, _ in entries():
        t, e = targets[b][c], q[b][c]
        total += 0.5 * (t * nl(p) + t * nl(e))
        total += 0.5 * (e * nl(p) + (1 - e) * nl(1 - p) + p * nl(e) + (1 - p) * nl(1 - e))
    reg_p = ((sum(P[0]) + sum(P[1])) / 2 - k) ** 2 / L**2
    reg_q = ((sum(q[0]) + sum(q[1])) / 2 - k) ** 2 / L**2
    return total / 6 + 0.5 * (reg_p + reg_q)


def test_role_loss_value():
    loss = role_loss()
    index = [2, 0]
    q = [[sig(v) for v in loss.label_logits[i].tolist()] for i in index]
    targets = [OBSERVED[i] for i in index]
    got = loss(torch.tensor(Z), torch.tensor(targets, dtype=torch.float32), torch.tensor(index))
    assert float(got.detach()) == pytest.approx(role_hand_value(q, targets, 2.9), rel=1e-6)


def test_role_gradient_reaches_only_the_batch_rows_and_treats_predictions_as_constant():
    loss = role_loss()
    index = [2, 0]
    targets = [OBSERVED[i] for i in index]
    loss(torch.tensor(Z), torch.tensor(targets, dtype=torch.float32), torch.tensor(index)).backward()
    grad = loss.label_logits.grad
    assert torch.count_nonzero(grad[[1, 3]]) == 0
    assert torch.count_nonzero(grad[[0, 2]]) == 2 * L

    # d/d(label logit) of the label-estimator half only: the classifier's predictions are detached there
    def estimator_half(logit_rows: list[list[float]]) -> float:
        q = [[sig(v) for v in row] for row in logit_rows]
        total = sum(0.5 * (t * nl(q[b][c]) + p * nl(q[b][c]) + (1 - p) * nl(1 - q[b][c]))
                    for b, c, p, t in ((b, c, P[b][c], targets[b][c]) for b in range(B) for c in range(L)))
        return total / 6 + 0.5 * ((sum(q[0]) + sum(q[1])) / 2 - 2.9) ** 2 / L**2

    rows = [loss.label_logits[i].tolist() for i in index]
    h = 1e-6
    for b in range(B):
        for c in range(L):
            up = [r[:] for r in rows]
            down = [r[:] for r in rows]
            up[b][c] += h
            down[b][c] -= h
            numeric = (estimator_half(up) - estimator_half(down)) / (2 * h)
            assert float(grad[index[b], c]) == pytest.approx(numeric, rel=1e-3, abs=1e-7)


def test_role_lr_multiplier_is_reported():
    loss = role_loss()
    groups = param_groups_lr_mult(loss)
    assert len(groups) == 1
    params, mult = groups[0]
    assert params == [loss.label_logits] and mult == 10.0
    assert param_groups_lr_mult(role_loss(params=LossParams(role_lr_mult=3.0)))[0][1] == 3.0
    for name in ("bce", "an", "an_ls", "wan", "epr", "em"):
        assert param_groups_lr_mult(build_loss(name, L, 4)) == []
        assert list(build_loss(name, L, 4).parameters()) == []


# ------------------------------------------------------------------------------- every loss / API


def build_any(name: str):
    return build_loss(name, L, 4, observed_labels=torch.tensor(OBSERVED))


def test_losses_tuple_matches_the_config():
    assert LOSSES == config.LOSSES


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_are_finite_at_saturated_logits(name):
    logits = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 50.0]], requires_grad=True)
    loss = build_any(name)
    value = loss(logits, torch.tensor([OBSERVED[0], OBSERVED[1]], dtype=torch.float32), torch.tensor([0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_logits_give_the_float32_loss(name):
    loss = build_any(name)
    targets, index = torch.tensor(T, dtype=torch.float32), torch.tensor([0, 2])
    logits = torch.tensor(Z).to(torch.bfloat16)
    got = loss(logits, targets, index)
    assert got.dtype == torch.float32
    reference = loss(logits.float(), targets, index)
    assert float(got.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_bad_shapes_raise(name):
    loss = build_any(name)
    index = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"targets shape \(2, 4\) must equal logits shape \(2, 3\)"):
        loss(torch.zeros(2, 3), torch.zeros(2, 4), index)
    with pytest.raises(ValueError, match="logits must be"):
        loss(torch.zeros(3), torch.zeros(3), index)
    with pytest.raises(ValueError, match="built for 3"):
        loss(torch.zeros(2, 4), torch.zeros(2, 4), index)


@pytest.mark.parametrize("name", ["role", "em_apl"])
def test_index_is_required_where_it_is_read(name):
    loss = build_any(name)
    with pytest.raises(ValueError, match="needs `index`"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="index must be"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="index must be"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


def test_build_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        build_loss("focal", 3, 4)
    with pytest.raises(ValueError, match="needs observed_labels"):
        build_loss("role", 3, 4)
    with pytest.raises(ValueError, match="needs observed_labels"):
        build_loss("em_apl", 3, 4)
    with pytest.raises(ValueError, match=r"must be \(4, 3\)"):
        build_loss("role", 3, 4, observed_labels=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="only 0"):
        build_loss("role", 3, 4, observed_labels=-torch.ones(4, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_loss("wan", 1, 4)
    with pytest.raises(ValueError, match="apl_warmup_epochs"):
        build_loss("em_apl", 3, 4, LossParams(apl_warmup_epochs=10, apl_num_epochs=10),
                   observed_labels=torch.zeros(4, 3))
    build_loss("em", 3, 4, LossParams(apl_warmup_epochs=10, apl_num_epochs=10))  # no schedule to check


@pytest.mark.parametrize("name, gib", [("role", 80.5), ("em_apl", 30.2)])
def test_losses_with_per_sample_state_refuse_an_openimages_size_split_with_the_numbers(name, gib):
    """9M images x 600 classes: ROLE and EM+APL would hold N x L state on every rank; refused in one
    line naming the loss, the sizes and the budget. Stateless losses are unaffected."""
    with pytest.raises(ValueError) as err:
        build_loss(name, 600, 9_000_000, observed_labels=None)
    message = str(err.value)
    assert "\n" not in message and f"loss.name={name}" in message
    assert f"9,000,000 images x 600 classes = {gib} GiB, over its budget of 8 GiB" in message
    assert "use a loss without one (an, an_ls, wan, epr, em, ll_r, ll_ct)" in message
    assert build_loss("an", 600, 9_000_000).num_train == 9_000_000
    assert build_loss(name, 80, 4, observed_labels=torch.eye(4, 80)) is not None  # COCO-size: fine
