"""Tests for losses.py: hand-checked values, limits, gradient directions, invariances, bad inputs.

Run from the repo root (CPU, a few seconds):
    python -m unittest test_losses -v
    python -m pytest -q test_losses.py
Hand-check values are computed from the papers' formulas: DPO (Rafailov et al. 2023, arXiv:2305.18290,
Eq. 7), mDPO (Wang et al. 2024, arXiv:2406.11839; github.com/luka-group/mDPO) and DAMA (Lu et al.
2025, arXiv:2502.01943, Eq. 15-16 and Algorithm 1; github.com/injadlu/DAMA); the released loss code is
transcribed below to compare against.
"""
import ast
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import torch
import torch.nn.functional as F

import losses
from losses import dama_loss, dpo_loss, mdpo_loss, preference_metrics, sequence_logps

LN2 = math.log(2.0)
DBAR = 0.0482190464911681  # dataset mean of cw - cl hard-coded in the released DAMA code


def t(*values, dtype=torch.float64, grad=False):
    """A 1-D tensor, float64 by default so that hand-checks hold to 1e-6 with room to spare."""
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def random_logps(n, seed, dtype=torch.float64):
    """n pairs of plausible summed log-probs (negative)."""
    g = torch.Generator().manual_seed(seed)
    return [-30 * torch.rand(n, generator=g, dtype=dtype) for _ in range(4)]


def sigmoid(x):
    """sigma(x) in python floats, for hand-checks that do not go through torch (no overflow)."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def softplus(x):
    """log(1 + e^x) = -log sigma(-x) in python floats, without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def hand_dama(h, cw, cl, gap_mean, keep, beta=0.1, dbar=DBAR, momentum=0.9):
    """DAMA's formulas (arXiv:2502.01943, Eq. 15-16 and Algorithm 1, with the released code's 1e-3 floor on
    beta_i) in plain python floats, with the kept indices S given.

    Returns (beta_i, per-sample losses, kept-mean loss, new gap_mean, unclamped beta_i)."""
    alpha_D = [sigmoid(w - l) / sigmoid(dbar) for w, l in zip(cw, cl)]
    alpha_M = sum(sigmoid(h[i]) for i in keep) / len(keep) / sigmoid(gap_mean)
    unclamped = [beta * a * alpha_M for a in alpha_D]
    beta_i = [max(b, 1e-3) for b in unclamped]
    per_sample = [softplus(-b * x) for b, x in zip(beta_i, h)]                # -log sigma(beta_i h_i)
    loss = sum(per_sample[i] for i in keep) / len(keep)
    new_gap = momentum * gap_mean + (1 - momentum) * sum(h) / len(h)
    return beta_i, per_sample, loss, new_gap, unclamped


def exact_inclusion(weights, k):
    """P(i in S) for S = k indices drawn one at a time without replacement, each with probability
    proportional to its weight among those left (what torch.multinomial(replacement=False) does),
    by enumerating every ordered draw: fine for N = 5, K = 4 (120 orderings)."""
    inclusion = [0.0] * len(weights)
    for order in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        for i in order:
            inclusion[i] += p
    return inclusion


# ---- Transcriptions of the authors' released loss code, in their names, to compare against ----

def released_mdpo_loss(policy_chosen_logps, policy_rejected_logps, policy_imageless_chosen_logps,
                       reference_chosen_logps, reference_rejected_logps, reference_imageless_chosen_logps, beta):
    """luka-group/mDPO mdpo_trainer.py, mDPOTrainer.dpo_loss, line by line (reference_free=False;
    self.beta -> beta). Note the authors' argument order: the imageless (corrupted) log-prob third."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios  # response preference
    image_conditional_pi_logratios = policy_chosen_logps - policy_imageless_chosen_logps
    image_conditional_ref_logratios = reference_chosen_logps - reference_imageless_chosen_logps
    # image-conditional preference
    image_conditional_logits = image_conditional_pi_logratios - image_conditional_ref_logratios
    anchor_logits = policy_chosen_logps - reference_chosen_logps  # anchored preference
    losses = -F.logsigmoid(beta * logits) \
        - F.logsigmoid(beta * image_conditional_logits) \
        - F.logsigmoid(beta * anchor_logits)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    imageless_rewards = beta * (policy_imageless_chosen_logps - reference_imageless_chosen_logps).detach()
    return losses, chosen_rewards, rejected_rewards, imageless_rewards


def released_dama_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                       vlm_chosen_logits, vlm_rejected_logits, beta, gap_mean, score_gap_mean,
                       sample_index=None, generator=None):
    """injadlu/DAMA DAMA/llava/train/train_dpo.py, line by line, on one process (all_gather_if_needed
    is the identity): `dpo_loss`, then the masked mean of LLaVA15DPOTrainer.compute_loss, then the
    gap_mean step of update_and_sync_tensor_mean (gamma = 0.9). gap_mean is a (1,) tensor, as
    self.gap_mean is there. Changed, and only this: the hard-coded 0.0482190464911681 is
    `score_gap_mean`; device='cuda' -> the inputs' device and dtype; `.to(torch.float32)` -> at least
    float32, so that float64 runs stay float64; the selection is `sample_index` when given (the
    injection that makes it deterministic), else torch.multinomial with `generator` rather than the
    global RNG; the random.choices branch (every weight 0) is left out: the tests keep weights > 0.

    Returns (losses, chosen_rewards, rejected_rewards, beta_used, global_mask, loss, new_gap_mean)."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    logits_diff = (vlm_chosen_logits - vlm_rejected_logits)
    logits_diff = F.sigmoid(logits_diff)
    logits_mean = torch.tensor(score_gap_mean, dtype=logits_diff.dtype, device=logits_diff.device)
    logits_mean = F.sigmoid(logits_mean)
    this_logits = logits_diff / logits_mean
    this_logits = this_logits.to(torch.promote_types(this_logits.dtype, torch.float32))
    A_gap = (policy_chosen_logps - policy_rejected_logps - reference_chosen_logps + reference_rejected_logps)
    A = A_gap.detach()
    A_sigmoid = F.sigmoid(A)
    mean = gap_mean
    weight_sample = torch.exp(-0.5 * ((A - mean)).pow(2))
    sample_num = int(weight_sample.numel() * (1 - 0.2))
    if sample_index is None:
        sample_index = torch.multinomial(weight_sample, sample_num, replacement=False, generator=generator)
    one_hot_like = torch.zeros_like(weight_sample)
    one_hot_like[sample_index] = 1
    global_mask = one_hot_like.detach()
    global_mask = global_mask.to(torch.float32)
    mean_sigmoid = F.sigmoid(mean)
    A_sigmoid_average = torch.mean(A_sigmoid[sample_index])
    this_ratio = A_sigmoid_average / mean_sigmoid
    this_ratio = this_logits * this_ratio
    beta_used = beta * this_ratio
    beta_used = beta_used.clamp(min=1e-3)
    losses = -F.logsigmoid(beta_used * logits)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    # compute_loss
    local_mask = global_mask.float()
    masked_losses = losses * local_mask
    effective_loss_count = local_mask.sum()
    effective_loss_count = effective_loss_count if effective_loss_count > 0 else 1
    loss = masked_losses.sum() / effective_loss_count
    # collect_preference_metrics -> update_and_sync_tensor_mean, after the loss
    gap_local = (policy_chosen_logps - policy_rejected_logps
                 - reference_chosen_logps + reference_rejected_logps).detach()
    gamma = 0.9
    new_gap_mean = gap_mean.clone()
    new_gap_mean.mul_(gamma).add_(gap_local.mean(), alpha=1 - gamma)
    return losses, chosen_rewards, rejected_rewards, beta_used, global_mask, loss, new_gap_mean


class Case(unittest.TestCase):
    def assertClose(self, actual, expected, atol=1e-6):
        actual = torch.as_tensor(actual, dtype=torch.float64)
        expected = torch.as_tensor(expected, dtype=torch.float64)
        self.assertTrue(torch.allclose(actual, expected, rtol=0, atol=atol), f"{actual} != {expected}")

    def assertBad(self, name, fn, *args, **kwargs):
        """fn(*args, **kwargs) raises ValueError whose message names the offending argument."""
        with self.assertRaisesRegex(ValueError, name):
            fn(*args, **kwargs)


class TestSequenceLogps(Case):
    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)   # (B, T, V)
        self.labels = torch.tensor([[-100, -100, 3, 1, 6, -100],                # prompt, 3 targets, pad
                                    [-100, 2, 0, 5, 4, 4]])                     # (B, T)

    def test_matches_hand_gather(self):
        expected = []
        for b in range(2):
            total = 0.0
            for pos in range(1, 6):  # labels[b, pos] is predicted by logits[b, pos - 1]
                if self.labels[b, pos] != -100:
                    total += torch.log_softmax(self.logits[b, pos - 1], -1)[self.labels[b, pos]].item()
            expected.append(total)
        out = sequence_logps(self.logits, self.labels)
        self.assertEqual(out.shape, (2,))
        self.assertEqual(out.dtype, torch.float32)
        self.assertClose(out, expected, atol=1e-5)

    def test_padding_and_ignored_positions_change_nothing(self):
        base = sequence_logps(self.logits, self.labels)
        pad_logits = torch.cat([self.logits, 50 * torch.randn(2, 4, 7, dtype=torch.float64)], 1)  # (B, T+4, V)
        pad_labels = torch.cat([self.labels, torch.full((2, 4), -100)], 1)                        # (B, T+4)
        self.assertClose(sequence_logps(pad_logits, pad_labels), base)
        # logits at positions that predict an ignored label do not matter either, even -inf
        changed = self.logits.clone()
        changed[0, 0] = 1e3    # predicts labels[0, 1] = -100
        changed[0, 4, 0] = -math.inf  # predicts labels[0, 5] = -100, and 0 is the dummy id
        changed = changed.requires_grad_()
        out = sequence_logps(changed, self.labels)
        self.assertClose(out, base)
        out.sum().backward()
        self.assertTrue(torch.isfinite(changed.grad).all())
        # a different ignore_index is honoured
        labels_99 = self.labels.masked_fill(self.labels == -100, 99)
        self.assertClose(sequence_logps(self.logits, labels_99, ignore_index=99), base)

    def test_shift_is_done_inside(self):
        base = sequence_logps(self.logits, self.labels)
        labels = self.labels.clone()
        labels[:, 0] = 3                      # the first label has no prediction: unused
        logits = self.logits.clone()
        logits[:, -1] = 123.0                 # the last logits predict past the end: unused
        self.assertClose(sequence_logps(logits, labels), base)
        logits[1, 0, 2] += 1.0                # predicts labels[1, 1] = 2: must change row 1 only
        out = sequence_logps(logits, labels)
        self.assertClose(out[0], base[0])
        self.assertFalse(torch.isclose(out[1], base[1]))

    def test_bf16_logits_are_summed_in_float32(self):
        logits = self.logits.to(torch.bfloat16)
        out = sequence_logps(logits, self.labels)
        self.assertEqual(out.dtype, torch.float32)
        self.assertClose(out, sequence_logps(logits.double(), self.labels), atol=1e-5)

    def test_row_without_labelled_tokens_gives_zero_and_finite_losses(self):
        """The docstring's promise: 0 (not nan) for a sequence with no labelled token, no gradient
        into its logits, and every loss stays finite when fed that 0."""
        labels = self.labels.clone()
        labels[0] = -100
        labels[0, 0] = 3   # labels[:, 0] is never a target (nothing predicts it): still an empty row
        logits = self.logits.clone().requires_grad_()
        out = sequence_logps(logits, labels)
        self.assertEqual(out[0].item(), 0.0)
        self.assertClose(out[1], sequence_logps(self.logits, self.labels)[1])
        out.sum().backward()
        self.assertTrue((logits.grad[0] == 0).all())
        self.assertTrue(torch.isfinite(logits.grad).all())
        empty = out[:1]                                                    # (1,) a 0 log-prob
        other = out[1:].detach()
        results = {"dpo": dpo_loss(empty, other, other, other)[0],
                   "mdpo": mdpo_loss(empty, other, empty.detach(), other, other, other)[0],
                   "dama": dama_loss(empty, other, other, other, t(0.3, dtype=torch.float32),
                                     t(0.1, dtype=torch.float32), 0.0)[0]}
        for name, value in results.items():
            self.assertTrue(torch.isfinite(value).all(), f"{name}: {value}")
        both_empty = dpo_loss(empty, empty, empty.detach(), empty.detach())[0]
        self.assertClose(both_empty, [LN2])                                 # h = 0

    def test_bad_inputs(self):
        self.assertBad("logits", sequence_logps, self.logits[0], self.labels)
        self.assertBad("logits", sequence_logps, self.labels.unsqueeze(-1), self.labels)
        self.assertBad("labels", sequence_logps, self.logits, self.labels.double())
        self.assertBad("labels", sequence_logps, self.logits, self.labels[:, :-1])
        self.assertBad("labels", sequence_logps, self.logits, self.labels.masked_fill(self.labels == 6, 7))


class TestDPO(Case):
    hand = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))  # h = 2

    def test_hand_check(self):
        losses_, chosen, rejected = dpo_loss(*self.hand, beta=0.1)
        self.assertClose(losses_, [0.598139])
        self.assertClose(chosen, [0.1])
        self.assertClose(rejected, [-0.1])
        self.assertClose(dpo_loss(*self.hand, beta=0.1, label_smoothing=0.1)[0], [0.618139])  # cDPO

    def test_policy_equals_reference_gives_ln2(self):
        pc, pr, _, _ = random_logps(8, seed=1)
        for beta, eps in [(0.1, 0.0), (0.5, 0.0), (0.1, 0.3)]:
            losses_, chosen, rejected = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, label_smoothing=eps)
            self.assertClose(losses_, torch.full((8,), LN2))
            self.assertClose(chosen, torch.zeros(8))
            self.assertEqual(preference_metrics(chosen, rejected)["rewards/accuracies"], 0.0)

    def test_equals_binary_cross_entropy_on_beta_h(self):
        pc, pr, rc, rr = random_logps(16, seed=2)
        h = (pc - pr) - (rc - rr)
        for beta, eps in [(0.1, 0.0), (0.3, 0.1), (1.0, 0.49)]:
            # cDPO = BCE with logits beta*h and soft target 1 - eps: an independent formulation
            bce = F.binary_cross_entropy_with_logits(beta * h, torch.full_like(h, 1 - eps), reduction="none")
            self.assertClose(dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0], bce, atol=1e-10)

    def test_label_smoothing_symmetry_limit(self):
        # loss(h) - loss(-h) = -(1 - 2 eps) beta h exactly, so it vanishes as eps -> 0.5 (the excluded
        # value, where the loss would be symmetric in the sign of the margin); swapping chosen and
        # rejected flips the sign of h.
        pc, pr, rc, rr = random_logps(8, seed=3)
        h = (pc - pr) - (rc - rr)
        gaps = []
        for eps in [0.0, 0.1, 0.25, 0.4, 0.49, 0.499, 0.4999]:
            diff = dpo_loss(pc, pr, rc, rr, 0.2, eps)[0] - dpo_loss(pr, pc, rr, rc, 0.2, eps)[0]
            self.assertClose(diff, -(1 - 2 * eps) * 0.2 * h, atol=1e-9)
            gaps.append(diff.abs().max().item())
        self.assertEqual(gaps, sorted(gaps, reverse=True))
        self.assertLess(gaps[-1], 1e-3 * gaps[0])

    def test_gradient_directions(self):
        for eps in [0.0, 0.2]:
            pc, pr = t(-10.0, -5.0, -20.0, grad=True), t(-12.0, -4.0, -20.0, grad=True)
            dpo_loss(pc, pr, t(-11.0, -5.0, -19.0), t(-11.0, -6.0, -21.0), label_smoothing=eps)[0].sum().backward()
            self.assertTrue((pc.grad < 0).all(), "raising log pi(yw) must lower the loss")
            self.assertTrue((pr.grad > 0).all(), "raising log pi(yl) must raise the loss")

    def test_rewards_are_detached(self):
        """Rewards are logged, never optimised: no loss may return them attached to the graph."""
        pc, pr = t(-1.0, grad=True), t(-2.0, grad=True)
        _, chosen, rejected = dpo_loss(pc, pr, t(-1.5), t(-1.5))
        self.assertFalse(chosen.requires_grad or rejected.requires_grad)
        pcc = t(-3.0, grad=True)
        _, chosen, rejected, corrupted = mdpo_loss(pc, pr, t(-1.5), t(-1.5), pcc, t(-2.5))
        self.assertFalse(chosen.requires_grad or rejected.requires_grad or corrupted.requires_grad)
        out = dama_loss(pc, pr, t(-1.5), t(-1.5), t(0.5), t(0.2), 0.0)
        self.assertFalse(any(x.requires_grad for x in out[1:5]))

    def test_bad_inputs(self):
        a, b = t(-1.0, -2.0), t(-1.0, -2.0)
        self.assertBad("reference_rejected_logps", dpo_loss, a, a, a, t(-1.0))
        self.assertBad("policy_rejected_logps", dpo_loss, a, a.view(2, 1), a, a)
        self.assertBad("policy_chosen_logps", dpo_loss, torch.tensor([-1, -2]), b, b, b)
        self.assertBad("reference_chosen_logps", dpo_loss, a, b, [-1.0, -2.0], b)
        self.assertBad("policy_chosen_logps", dpo_loss, t(), t(), t(), t())
        for beta in [0.0, -0.1, float("nan")]:
            self.assertBad("beta", dpo_loss, a, b, a, b, beta=beta)
        for eps in [-0.1, 0.5, 0.7]:
            self.assertBad("label_smoothing", dpo_loss, a, b, a, b, label_smoothing=eps)


class TestMDPO(Case):
    hand = (t(-10.0), t(-12.0), t(-11.0), t(-11.0), t(-13.0), t(-12.5))

    def test_hand_check_and_ablations(self):
        losses_, chosen, rejected, corrupted = mdpo_loss(*self.hand, beta=0.1)
        self.assertClose(losses_, [0.598139 + 0.620957 + 0.644397])
        self.assertClose(losses_, [1.863493])
        self.assertClose(chosen, [0.1])
        self.assertClose(rejected, [-0.1])
        self.assertClose(corrupted, [-0.05])
        self.assertClose(mdpo_loss(*self.hand, use_conditional=False)[0], [0.598139 + 0.644397])
        self.assertClose(mdpo_loss(*self.hand, use_anchor=False)[0], [0.598139 + 0.620957])
        both_off = mdpo_loss(*self.hand, use_conditional=False, use_anchor=False)[0]
        self.assertClose(both_off, dpo_loss(*self.hand[:4])[0])
        # without the conditional term the corrupted forward pass can be skipped
        out = mdpo_loss(*self.hand[:4], None, None, use_conditional=False)
        self.assertClose(out[0], [0.598139 + 0.644397])
        self.assertIsNone(out[3])

    def test_policy_equals_reference_gives_3ln2(self):
        pc, pr, pcc, _ = random_logps(8, seed=4)
        losses_ = mdpo_loss(pc, pr, pc.clone(), pr.clone(), pcc, pcc.clone())[0]
        self.assertClose(losses_, torch.full((8,), 3 * LN2))
        # the anchor delta shifts only the anchored term: -log sigma(0 - delta)
        self.assertClose(mdpo_loss(pc, pr, pc, pr, pcc, pcc, anchor=1.0)[0],
                         torch.full((8,), 2 * LN2 + math.log1p(math.e)))

    def test_equals_independent_sum_of_terms(self):
        pc, pr, rc, rr = random_logps(16, seed=5)
        pcc, rcc, _, _ = random_logps(16, seed=6)
        beta, delta = 0.3, 0.2

        def bce(x):
            return F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
        expected = (bce(beta * ((pc - pr) - (rc - rr))) + bce(beta * ((pc - pcc) - (rc - rcc)))
                    + bce(beta * (pc - rc) - delta))
        self.assertClose(mdpo_loss(pc, pr, rc, rr, pcc, rcc, beta=beta, anchor=delta)[0], expected, atol=1e-10)

    def test_gradient_directions(self):
        def grads(**flags):
            logps = [t(-10.0, -30.0, -5.0, grad=True) for _ in range(3)]
            pc, pr, pcc = logps
            mdpo_loss(pc, pr, t(-11.0, -29.0, -6.0), t(-11.0, -31.0, -4.0), pcc, t(-12.0, -33.0, -5.0),
                      **flags)[0].sum().backward()
            return [torch.zeros(3, dtype=torch.float64) if x.grad is None else x.grad for x in logps]
        g_chosen, g_rejected, g_corrupted = grads()
        self.assertTrue((g_chosen < 0).all(), "raising log pi(yw|m) must lower the loss")
        self.assertTrue((g_rejected > 0).all())
        self.assertTrue((g_corrupted > 0).all(), "L_CoPO must push log pi(yw|m~) down")
        # the conditional term alone is what touches the corrupted log-prob
        self.assertTrue((grads(use_conditional=False)[2] == 0).all())
        # the anchor pushes the chosen log-prob up and nothing else
        without = grads(use_anchor=False)
        self.assertTrue((g_chosen - without[0] < 0).all(), "L_AncPO must push log pi(yw|m) up")
        self.assertClose(g_rejected, without[1], atol=0)
        self.assertClose(g_corrupted, without[2], atol=0)

    def test_matches_released_mdpo_code(self):
        """mdpo_loss equals a line-by-line transcription of the authors' mDPOTrainer.dpo_loss: losses,
        the three rewards and the gradients, on random inputs (several seeds and batch sizes)."""
        for seed, n in [(10, 1), (11, 3), (12, 8), (13, 17)]:
            for beta in [0.1, 0.7]:
                logps = random_logps(n, seed) + random_logps(n, seed + 100)[:2]
                pc, pr, rc, rr, pcc, rcc = [x.clone().requires_grad_() for x in logps]
                ours = mdpo_loss(pc, pr, rc, rr, pcc, rcc, beta=beta)
                g_ours = torch.autograd.grad(ours[0].sum(), [pc, pr, pcc])
                theirs = released_mdpo_loss(pc, pr, pcc, rc, rr, rcc, beta)
                g_theirs = torch.autograd.grad(theirs[0].sum(), [pc, pr, pcc])
                for a, b in zip(ours, theirs):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
                    self.assertFalse(a.requires_grad and not b.requires_grad)
                for a, b in zip(g_ours, g_theirs):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def test_bad_inputs(self):
        a, b = t(-1.0, -2.0), t(-3.0, -4.0)
        self.assertBad("reference_corrupted_chosen_logps", mdpo_loss, a, b, a, b, a, t(-1.0))
        self.assertBad("policy_corrupted_chosen_logps", mdpo_loss, a, b, a, b, None, b)
        self.assertBad("policy_corrupted_chosen_logps", mdpo_loss, a, b, a, b, torch.tensor([1, 2]), b)
        self.assertBad("policy_rejected_logps", mdpo_loss, a, t(-1.0, -2.0, -3.0), a, b, a, b)
        self.assertBad("beta", mdpo_loss, a, b, a, b, a, b, beta=0.0)
        self.assertBad("anchor", mdpo_loss, a, b, a, b, a, b, anchor=float("nan"))


class TestDAMA(Case):
    h = t(2.0, -1.0, 0.5, 3.0)
    cw, cl = t(0.6, 0.3, 0.5, 0.45), t(0.4, 0.7, 0.5, 0.55)

    def run_dama(self, h, gap_mean=0.0, cw=None, cl=None, **kwargs):
        """DAMA with the margin h put on policy_chosen (other log-probs 0)."""
        zero = torch.zeros_like(h)
        cw = torch.zeros_like(h) if cw is None else cw
        cl = torch.zeros_like(h) if cl is None else cl
        return dama_loss(h, zero, zero, zero, cw, cl, gap_mean, **kwargs)

    def test_hand_check(self):
        losses_, chosen, rejected, beta_used, keep_mask, new_gap = self.run_dama(
            self.h, 0.0, self.cw, self.cl, beta=0.1, score_gap_mean=DBAR, keep_indices=torch.tensor([0, 2, 3]))
        self.assertClose(beta_used, [0.175802, 0.128314, 0.159868, 0.151882])
        self.assertClose(losses_, [0.532719, 0.759361, 0.653979, 0.491055])
        self.assertClose(keep_mask, [1.0, 0.0, 1.0, 1.0], atol=0)
        self.assertClose((losses_ * keep_mask).sum() / keep_mask.sum(), 0.559251)
        self.assertClose(new_gap, 0.1125)
        self.assertIsInstance(new_gap, float)
        self.assertClose(chosen, 0.1 * self.h)  # rewards use the base beta
        self.assertClose(rejected, torch.zeros(4))

    def test_policy_equals_reference_gives_ln2(self):
        pc, pr, _, _ = random_logps(10, seed=7)
        cw, cl, _, _ = random_logps(10, seed=8)
        out = dama_loss(pc, pr, pc.clone(), pr.clone(), cw / 30, cl / 30, 0.7,
                        generator=torch.Generator().manual_seed(0))
        self.assertClose(out[0], torch.full((10,), LN2))

    def test_equals_dpo_with_per_sample_beta_and_beta_has_no_gradient(self):
        pc = t(2.0, -1.0, 0.5, 3.0, grad=True)
        zero = torch.zeros(4, dtype=torch.float64)
        losses_, _, _, beta_used, keep_mask, _ = dama_loss(pc, zero, zero, zero, self.cw, self.cl, 0.3,
                                                           generator=torch.Generator().manual_seed(1))
        self.assertFalse(beta_used.requires_grad)
        bce = F.binary_cross_entropy_with_logits(beta_used * pc.detach(), torch.ones(4, dtype=torch.float64),
                                                 reduction="none")
        self.assertClose(losses_, bce, atol=1e-10)
        ((losses_ * keep_mask).sum() / keep_mask.sum()).backward()
        # d/dh of -log sigma(beta_i h_i) with beta_i held constant, only for the kept samples
        expected = -beta_used * torch.sigmoid(-beta_used * pc.detach()) * keep_mask / keep_mask.sum()
        self.assertClose(pc.grad, expected, atol=1e-12)
        self.assertTrue((pc.grad[keep_mask == 1] < 0).all(), "raising log pi(yw) must lower the loss")

    def test_keep_count(self):
        for n, ratio in [(4, 0.8), (10, 0.8), (10, 0.75), (7, 0.5), (5, 1.0), (1, 0.8), (3, 0.1)]:
            h = torch.linspace(-1, 1, n, dtype=torch.float64)
            mask = self.run_dama(h, keep_ratio=ratio, generator=torch.Generator().manual_seed(0))[4]
            self.assertEqual(int(mask.sum()), max(1, int(n * ratio)), (n, ratio))
            self.assertTrue(((mask == 0) | (mask == 1)).all())
        mask = self.run_dama(torch.randn(9, dtype=torch.float64), keep_ratio=1.0)[4]
        self.assertTrue((mask == 1).all(), "keep_ratio=1.0 keeps every sample")

    def test_seeded_selection_is_reproducible_and_random(self):
        h = torch.linspace(-2, 2, 12, dtype=torch.float64)
        masks = [self.run_dama(h, generator=torch.Generator().manual_seed(s), keep_ratio=0.5)[4] for s in range(6)]
        again = self.run_dama(h, generator=torch.Generator().manual_seed(0), keep_ratio=0.5)[4]
        self.assertTrue(torch.equal(masks[0], again))
        self.assertTrue(any(not torch.equal(masks[0], m) for m in masks[1:]), "the selection ignores the generator")

    def test_selection_weights_use_the_unscaled_margin(self):
        # w = exp(-(h - gap_mean)^2 / 2): h = 8 gets weight ~1e-14 and is (essentially) never kept.
        # Were h scaled by beta = 0.1 first, its weight would be 0.73 and it would often be kept.
        h = t(0.0, 0.1, -0.1, 0.2, 8.0)
        for seed in range(20):
            mask = self.run_dama(h, generator=torch.Generator().manual_seed(seed))[4]
            self.assertEqual(mask[4].item(), 0.0)

    def test_underflowing_weights_do_not_crash(self):
        h = t(1e4, -1e4, 5e3, 300.0, -50.0, 1e3, 40.0, -1e3, 2e4, 99.0)   # every weight underflows to 0
        masks = set()
        for seed in range(5):
            out = self.run_dama(h, generator=torch.Generator().manual_seed(seed))
            self.assertEqual(int(out[4].sum()), 8)                           # K distinct samples
            self.assertTrue(all(torch.isfinite(x).all() for x in out[:5]))
            masks.add(tuple(out[4].tolist()))
        self.assertGreater(len(masks), 1, "the fallback must still draw at random")
        again = self.run_dama(h, generator=torch.Generator().manual_seed(4))[4]
        self.assertEqual(tuple(again.tolist()), tuple(out[4].tolist()))
        # only one positive weight while K = 3: that sample is always kept, the rest drawn uniformly
        h = t(0.0, 1e4, -1e4, 3e3)
        for seed in range(5):
            mask = self.run_dama(h, generator=torch.Generator().manual_seed(seed))[4]
            self.assertEqual(mask.tolist()[0], 1.0)
            self.assertEqual(int(mask.sum()), 3)

    def test_beta_used_is_clamped_at_1e_minus_3(self):
        """beta_i = max(beta * alpha_D_i * alpha_M, 1e-3): each case checks by hand (hand_dama) that
        the unclamped value is below 1e-3 where the clamp must bind and above it where it must not."""
        # alpha_D = sigma(-50) / sigma(0) ~ 4e-22 would send beta_i to ~0; the clamp keeps 1e-3
        out = self.run_dama(self.h, 0.0, self.cw - 50, self.cl, keep_ratio=1.0)
        self.assertTrue((out[3] >= 1e-3).all())
        self.assertClose(out[3], torch.full((4,), 1e-3, dtype=torch.float64), atol=1e-12)
        # binding through alpha_M: every kept sigma(h_i) ~ e^-20 against sigma(gap_mean = 3) ~ 0.95
        h, cw, cl = [-20.0, -22.0, -25.0], [0.1, 0.4, -0.2], [0.3, 0.1, 0.2]
        expected, _, _, _, unclamped = hand_dama(h, cw, cl, 3.0, [0, 1, 2], dbar=0.0)
        self.assertTrue(all(u < 1e-3 for u in unclamped), unclamped)          # ~1e-10: the clamp binds
        out = self.run_dama(t(*h), 3.0, t(*cw), t(*cl), keep_ratio=1.0)
        self.assertClose(out[3], torch.full((3,), 1e-3, dtype=torch.float64), atol=1e-15)
        self.assertClose(out[0], -F.logsigmoid(1e-3 * t(*h)), atol=1e-12)     # the loss uses the clamped beta
        # NOT binding although gap_mean is huge: alpha_M = mean(0, sigma(1), sigma(2)) / sigma(1e4) ~ 0.54
        out = self.run_dama(t(-1e4, 1.0, 2.0), 1e4, keep_ratio=1.0)
        self.assertTrue((out[3] >= 1e-3).all())
        _, _, _, _, unclamped = hand_dama([-1e4, 1.0, 2.0], [0.0] * 3, [0.0] * 3, 1e4, [0, 1, 2], dbar=0.0)
        self.assertTrue(all(u > 1e-2 for u in unclamped), unclamped)
        self.assertClose(out[3], unclamped, atol=1e-12)
        # mixed, in one batch: only sample 0 (alpha_D = sigma(-12) / 0.5 ~ 1e-5) is clamped
        h, cw, cl = [0.5, 0.2, 1.0], [-12.0, 0.0, 3.0], [0.0, 0.0, 0.0]
        expected, _, _, _, unclamped = hand_dama(h, cw, cl, 0.4, [0, 1, 2], dbar=0.0)
        self.assertLess(unclamped[0], 1e-3)
        self.assertTrue(all(u > 1e-3 for u in unclamped[1:]), unclamped)
        out = self.run_dama(t(*h), 0.4, t(*cw), t(*cl), keep_ratio=1.0)
        self.assertClose(out[3], expected, atol=1e-12)
        self.assertEqual(out[3][0].item(), 1e-3)

    def test_gap_mean_ema(self):
        h = t(2.0, -1.0, 0.5, 3.0, 10.0)
        out = self.run_dama(h, 0.5, momentum=0.9, keep_indices=torch.tensor([0]))
        self.assertIsInstance(out[5], float)
        self.assertClose(out[5], 0.9 * 0.5 + 0.1 * h.mean())   # mean over ALL samples, not the kept one
        gap = torch.tensor(0.5, dtype=torch.float32)
        out = self.run_dama(h, gap, momentum=0.8)
        self.assertIsInstance(out[5], torch.Tensor)
        self.assertEqual((out[5].shape, out[5].dtype), (torch.Size([]), torch.float32))
        self.assertClose(out[5], 0.8 * 0.5 + 0.2 * h.mean())
        self.assertClose(self.run_dama(h, 0.5, momentum=1.0)[5], 0.5)

    def test_hand_check_with_nonzero_gap_mean(self):
        """The DAMA hand-check moved to gap_mean != 0, once as a float and once as a 0-dim
        tensor: beta_i, losses, the kept-mean loss and the new gap_mean, from the formulas (hand_dama,
        plain python) AND as literal numbers. Replacing sigma(gap_mean) by 0.5 would move beta_i by
        20-34% here, far beyond the 1e-6 tolerance (asserted below, so the case cannot drift to one
        where that mutation goes unseen). Centring the selection weights on 0 does not show here, the
        indices being injected: test_inclusion_frequencies_... catches it."""
        cases = [  # gap_mean, kept S, beta_i, per-sample losses, kept-mean loss, new gap_mean
            (0.7, [0, 2, 3], [0.131551, 0.096017, 0.119628, 0.113652],
             [0.570224, 0.742307, 0.663687, 0.537131], 0.590347, 0.7425),
            (torch.tensor(-0.4), [1, 2, 3], [0.164463, 0.120038, 0.149557, 0.142085],
             [0.542148, 0.754966, 0.656457, 0.502561], 0.637995, -0.2475)]
        h, cw, cl = self.h.tolist(), self.cw.tolist(), self.cl.tolist()
        for gap_mean, keep, beta_i, per_sample, loss, new_gap in cases:
            g = float(gap_mean)
            by_formula = hand_dama(h, cw, cl, g, keep)
            for a, b in zip(by_formula[:4], (beta_i, per_sample, loss, new_gap)):
                self.assertClose(a, b, atol=1e-6)                 # the literals are the formulas' values
            # sigma(gap_mean) -> 0.5 would move beta_i by far more than the tolerance
            sigma_half = [b * sigmoid(g) / 0.5 for b in by_formula[0]]   # sigma(gap_mean) -> 0.5
            self.assertGreater(max(abs(a - b) for a, b in zip(sigma_half, beta_i)), 1e-2)
            out = self.run_dama(self.h, gap_mean, self.cw, self.cl, beta=0.1, score_gap_mean=DBAR,
                                keep_indices=torch.tensor(keep))
            losses_, _, _, beta_used, keep_mask, new_gap_mean = out
            self.assertClose(beta_used, beta_i)
            self.assertClose(losses_, per_sample)
            self.assertClose(keep_mask, [float(i in keep) for i in range(4)], atol=0)
            self.assertClose((losses_ * keep_mask).sum() / keep_mask.sum(), loss)
            self.assertClose(new_gap_mean, new_gap)
            self.assertIsInstance(new_gap_mean, type(gap_mean))
            if isinstance(gap_mean, torch.Tensor):
                self.assertEqual((new_gap_mean.shape, new_gap_mean.dtype), (torch.Size([]), gap_mean.dtype))

    def test_matches_released_dama_code(self):
        """dama_loss equals a line-by-line transcription of the authors' dpo_loss + compute_loss +
        gap_mean update, with the same kept indices injected: losses, rewards, beta_i, mask, the
        reduced loss, the new gap_mean and the gradient, for several seeds and batch sizes, gap_mean
        a float and a 0-dim tensor, score_gap_mean != 0, float64 and float32."""
        cases = [(20, 2, 0.37, DBAR), (21, 5, -1.3, 0.25), (22, 8, 2.0, -0.3), (23, 13, 0.0, DBAR), (24, 30, 5.0, 1.1)]
        for seed, n, gap, dbar in cases:
            for dtype in [torch.float64, torch.float32]:
                for gap_is_tensor in [False, True]:
                    g = torch.Generator().manual_seed(seed)
                    logps = [x.to(dtype) for x in random_logps(n, seed)]
                    cw, cl = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
                    k = int(n * 0.8)
                    sample_index = torch.randperm(n, generator=g)[:k]
                    gap_mean = torch.tensor(gap, dtype=dtype) if gap_is_tensor else gap
                    pc, pr, rc, rr = [x.clone().requires_grad_() for x in logps]
                    ours = dama_loss(pc, pr, rc, rr, cw, cl, gap_mean, beta=0.2, score_gap_mean=dbar,
                                     keep_indices=sample_index)
                    losses_, chosen, rejected, beta_used, keep_mask, new_gap_mean = ours
                    loss = (losses_ * keep_mask).sum() / keep_mask.sum()
                    theirs = released_dama_loss(pc, pr, rc, rr, cw, cl, 0.2, torch.tensor([gap], dtype=dtype), dbar,
                                                sample_index=sample_index)
                    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}
                    msg = f"seed {seed} n {n} {dtype} tensor gap {gap_is_tensor}"
                    for a, b in zip((losses_, chosen, rejected, beta_used, loss), theirs[:4] + theirs[5:6]):
                        torch.testing.assert_close(a, b, **tol, msg=msg)
                    torch.testing.assert_close(keep_mask, theirs[4].to(keep_mask.dtype), rtol=0, atol=0)
                    torch.testing.assert_close(torch.as_tensor(new_gap_mean, dtype=dtype).reshape(1), theirs[6],
                                               **tol, msg=msg)
                    torch.testing.assert_close(torch.autograd.grad(loss, [pc, pr, rc, rr]),
                                               torch.autograd.grad(theirs[5], [pc, pr, rc, rr]), **tol, msg=msg)

    def test_drawn_selection_matches_released_code_with_the_same_generator(self):
        """Without injection, with moderate margins (every weight > 0) and gap_mean != 0, dama_loss
        draws exactly the released torch.multinomial selection from the same seeded generator."""
        for seed, gap_is_tensor in [(30, False), (31, True), (32, False), (33, True)]:
            g = torch.Generator().manual_seed(seed)
            h = 1.5 * torch.randn(10, generator=g, dtype=torch.float64) + 1.0   # margins around gap_mean
            cw, cl = torch.rand(10, generator=g, dtype=torch.float64), torch.rand(10, generator=g, dtype=torch.float64)
            zero = torch.zeros(10, dtype=torch.float64)
            gap_mean = torch.tensor(1.0, dtype=torch.float64) if gap_is_tensor else 1.0
            ours = dama_loss(h, zero, zero, zero, cw, cl, gap_mean, beta=0.1, score_gap_mean=DBAR,
                             generator=torch.Generator().manual_seed(seed))
            theirs = released_dama_loss(h, zero, zero, zero, cw, cl, 0.1, torch.tensor([1.0], dtype=torch.float64),
                                        DBAR, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(ours[4], theirs[4].double(), rtol=0, atol=0, msg=f"seed {seed}")
            torch.testing.assert_close(ours[3], theirs[3], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10)

    def test_inclusion_frequencies_match_weighted_sampling_without_replacement(self):
        """Over many seeded draws, each sample's kept frequency matches the exact inclusion probability
        of drawing K = 4 of N = 5 without replacement with probability ~ w = exp(-(h - gap_mean)^2 / 2),
        gap_mean = 1 and moderate weights 0.24..1 (so every sample is kept sometimes and dropped
        sometimes). Tolerance: 4 binomial standard errors per index. The same check against weights
        centred on 0 instead of gap_mean (or uniform weights) is off by > 10 standard errors."""
        gap_mean, n_draws = 1.0, 4000
        h = t(*[gap_mean + d for d in [0.0, 0.5, -0.9, 1.3, -1.7]])
        w = [math.exp(-0.5 * (x - gap_mean) ** 2) for x in h.tolist()]        # 1.0, .88, .67, .43, .24
        p = exact_inclusion(w, 4)
        se = [math.sqrt(q * (1 - q) / n_draws) for q in p]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # thousands of 5-element calls: thread wake-ups would cost more than the math
        try:
            g = torch.Generator().manual_seed(0)
            counts = sum(self.run_dama(h, gap_mean, generator=g)[4] for _ in range(n_draws))
        finally:
            torch.set_num_threads(threads)
        freq = (counts / n_draws).tolist()
        for i in range(5):
            self.assertLess(abs(freq[i] - p[i]), 4 * se[i], f"index {i}: {freq} vs exact {p}")
        # the check has power: the wrong centring (w = exp(-h^2 / 2)) or uniform weights are far off
        for wrong in ([math.exp(-0.5 * x ** 2) for x in h.tolist()], [1.0] * 5):
            q = exact_inclusion(wrong, 4)
            self.assertGreater(max(abs(a - b) / s for a, b, s in zip(q, p, se)), 10)

    def test_beta_used_is_at_least_float32(self):
        """The docstring's promise: beta_i (and so the loss) is computed in at least float32, so
        half-precision log-probs give float32 beta_used and float64 log-probs keep float64."""
        for dtype, expected in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                (torch.float32, torch.float32), (torch.float64, torch.float64)]:
            h = torch.tensor([2.0, -1.0, 0.5, 3.0], dtype=dtype)
            cw, cl = self.cw.to(dtype), self.cl.to(dtype)
            out = self.run_dama(h, 0.0, cw, cl, score_gap_mean=DBAR, keep_indices=torch.tensor([0, 2, 3]))
            self.assertEqual(out[3].dtype, expected, dtype)
            self.assertEqual(out[0].dtype, expected, dtype)
            self.assertClose(out[3], [0.175802, 0.128314, 0.159868, 0.151882], atol=5e-3)

    def test_bad_inputs(self):
        h, s = self.h, self.cw
        self.assertBad("chosen_scores", self.run_dama, h, 0.0, t(0.1, 0.2), s)
        self.assertBad("rejected_scores", self.run_dama, h, 0.0, s, s.view(4, 1))
        self.assertBad("chosen_scores", self.run_dama, h, 0.0, torch.tensor([1, 0, 1, 0]), s)
        self.assertBad("policy_rejected_logps", dama_loss, h, h[:3], h, h, s, s, 0.0)
        self.assertBad("reference_chosen_logps", dama_loss, h, h, h.long(), h, s, s, 0.0)
        self.assertBad("beta", self.run_dama, h, beta=-1.0)
        for ratio in [0.0, -0.5, 1.5]:
            self.assertBad("keep_ratio", self.run_dama, h, keep_ratio=ratio)
        self.assertBad("momentum", self.run_dama, h, momentum=1.1)
        self.assertBad("gap_mean", self.run_dama, h, torch.zeros(1))
        self.assertBad("gap_mean", self.run_dama, h, "0")
        self.assertBad("generator", self.run_dama, h, generator=0)
        for idx in [torch.tensor([0, 4]), torch.tensor([1, 1]), torch.tensor([], dtype=torch.long),
                    torch.tensor([0.0]), torch.tensor([True, False, True, True])]:
            self.assertBad("keep_indices", self.run_dama, h, keep_indices=idx)


class TestExtremeMargins(Case):
    def test_finite_losses_and_gradients(self):
        for dtype in [torch.float32, torch.bfloat16]:
            pc = torch.tensor([1e4, -1e4, 0.0, 5e3, -3e3], dtype=dtype, requires_grad=True)
            zero = torch.zeros(5, dtype=dtype)
            pcc = torch.tensor([-1e4, 1e4, 0.0, -5e3, 3e3], dtype=dtype, requires_grad=True)
            results = {
                "dpo": dpo_loss(pc, zero, zero, zero)[0],
                "cdpo": dpo_loss(pc, zero, zero, zero, label_smoothing=0.3)[0],
                "mdpo": mdpo_loss(pc, zero, zero, zero, pcc, zero)[0],
                "dama": dama_loss(pc, zero, zero, zero, zero, zero, 0.0, generator=torch.Generator().manual_seed(0))[0],
                # sigma(h) and sigma(gap_mean) both underflow: alpha_M formed as a ratio would be 0 / 0
                "dama_far_gap": dama_loss(pc / 1e4 - 1e4, zero, zero, zero, zero, zero, -1e4, keep_ratio=1.0)[0],
            }
            for name, value in results.items():
                pc.grad, pcc.grad = None, None
                self.assertTrue(torch.isfinite(value).all(), f"{name} {dtype}: {value}")
                value.sum().backward()
                self.assertTrue(torch.isfinite(pc.grad).all(), f"{name} {dtype} grad: {pc.grad}")
            # -log sigma(-1000) = 1000, not inf
            self.assertClose(results["dpo"][1].float(), 1000.0, atol=1.0)


class TestMetrics(Case):
    def test_preference_metrics(self):
        m = preference_metrics(t(0.1, 0.2, 0.0), t(-0.1, 0.3, 0.0))
        self.assertEqual(set(m), {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"})
        self.assertClose(m["rewards/margins"], 0.1 / 3)
        self.assertClose(m["rewards/accuracies"], 1 / 3)  # ties do not count
        self.assertBad("rejected_rewards", preference_metrics, t(0.1), t(0.1, 0.2))


class TestChosenNLL(Case):
    """RPO's NLL term: the chosen response's mean token cross-entropy, per pair."""

    def test_hand_values_and_gradient(self):
        pc = torch.tensor([-10.0, -6.0], requires_grad=True)
        nll = losses.chosen_nll_loss(pc, torch.tensor([5, 2]))
        self.assertEqual(nll.tolist(), [2.0, 3.0])          # 10 / 5, 6 / 2
        nll.sum().backward()
        self.assertClose(pc.grad, torch.tensor([-0.2, -0.5]))  # it pulls log pi(yw) up, shorter responses harder

    def test_equals_the_token_mean_cross_entropy(self):
        torch.manual_seed(0)
        logits, labels = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
        labels[:, :2] = -100
        labels[2, 5:] = -100                                 # a shorter response
        n = (labels[:, 1:] != -100).sum(1)
        got = losses.chosen_nll_loss(sequence_logps(logits, labels), n)
        for i in range(3):
            want = F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100)
            self.assertAlmostEqual(got[i].item(), want.item(), places=5)

    def test_bad_lengths_are_refused(self):
        with self.assertRaisesRegex(ValueError, "chosen_lengths must be >= 1"):
            losses.chosen_nll_loss(torch.tensor([-1.0, -2.0]), torch.tensor([3, 0]))
        with self.assertRaisesRegex(ValueError, "chosen_lengths must be a tensor of shape"):
            losses.chosen_nll_loss(torch.tensor([-1.0, -2.0]), torch.tensor([3]))


class TestStandalone(Case):
    def test_imports_only_torch_and_the_standard_library(self):
        with open(losses.__file__) as f:
            tree = ast.parse(f.read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        self.assertLessEqual(names, {"torch"} | set(sys.stdlib_module_names), names)

    def test_imports_alone_in_a_fresh_interpreter(self):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(losses.__file__, tmp)
            code = ("import os, torch, losses; z = torch.zeros(2); "
                    "print(os.path.dirname(os.path.abspath(losses.__file__))); "
                    "print(losses.dpo_loss(z, z, z, z)[0].sum().item())")
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=300)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            where, value = proc.stdout.split()
            self.assertEqual(os.path.realpath(where), os.path.realpath(tmp))
            self.assertAlmostEqual(float(value), 2 * LN2, places=6)

    def test_readme_snippet_runs_with_losses_py_alone(self):
        """The README's "Use losses.py in your own project" block, run as written beside a copy of losses.py."""
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
            readme = f.read()
        section = readme.split("## Use losses.py in your own project", 1)[1]
        code = section.split("```python\n", 1)[1].split("```", 1)[0]
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(losses.__file__, tmp)
            code += "\nprint(losses.mean().item())\n"
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=300)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(math.isfinite(float(proc.stdout.split()[-1])))


if __name__ == "__main__":
    unittest.main()
