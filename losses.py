"""Preference losses written out by hand: DPO (and cDPO), mDPO and DAMA.

Copy this file alone into your project: it imports only torch and the standard library.
Every loss takes per-sequence SUMMED log-probs (see `sequence_logps`), shape (B,), and returns
per-sample losses, shape (B,), to reduce yourself (`.mean()`; DAMA: the keep-mask mean), and
detached rewards beta * (log pi(y) - log ref(y)). B = preference pairs, T = sequence length,
V = vocabulary. The margin h (`logits` in the authors' code) is never scaled by beta here:
    h = (log pi(yw) - log pi(yl)) - (log ref(yw) - log ref(yl))

Papers and the released code this file was checked against:
    DPO   arXiv:2305.18290 | eric-mitchell/direct-preference-optimization trainers.py
    cDPO  Mitchell 2023, ericmitchell.ai/cdpo.pdf | huggingface/trl dpo_trainer.py ("sigmoid")
    mDPO  arXiv:2406.11839 | luka-group/mDPO mdpo_trainer.py (mDPOTrainer.dpo_loss)
    DAMA  arXiv:2502.01943 | injadlu/DAMA DAMA/llava/train/train_dpo.py (dpo_loss, LLaVA15DPOTrainer)
    RPO   arXiv:2404.19733 (the NLL term on the chosen response) | huggingface/trl dpo_trainer.py (rpo_alpha)
"""
import math

import torch
import torch.nn.functional as F


def _check_logps(**tensors):
    """Raise ValueError unless every tensor is floating point and all share one shape (B,), B >= 1."""
    first = None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating-point tensor, got {got}")
        if x.ndim != 1 or x.numel() == 0:
            raise ValueError(f"{name} must have shape (batch_size,), got {tuple(x.shape)}")
        if first is None:
            first = (name, x.shape)
        elif x.shape != first[1]:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {first[0]} has {tuple(first[1])}")


def _check_number(name, value, low, high, low_open, high_open):
    """Raise ValueError unless `value` is a real number in the interval low..high (open ends as flagged)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    """h = log pi(yw)/pi(yl) - log ref(yw)/ref(yl): the argument of sigma in Eq. 7 of arXiv:2305.18290, before beta."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps          # (B,)
    ref_logratios = reference_chosen_logps - reference_rejected_logps   # (B,)
    return pi_logratios - ref_logratios                                 # (B,)


def _rewards(beta, policy_logps, reference_logps):
    """Implicit reward r(y) = beta * log pi(y)/ref(y) (Eq. 5 of arXiv:2305.18290, without beta log Z), detached."""
    return beta * (policy_logps - reference_logps).detach()             # (B,)


def sequence_logps(logits, labels, ignore_index=-100):
    """Sum of log p(label_t | tokens before t) over the labelled positions of each sequence.

    `labels` are ALIGNED with the input ids (a copy of input_ids holding `ignore_index` at every
    position that is not a target: prompt, image, padding) and the shift happens HERE, as in
    eric-mitchell's `_get_batch_logps` and TRL: logits[:, t] predicts labels[:, t + 1], so
    labels[:, 0] and logits[:, -1] are never used. Computed in float32 whatever the logits dtype
    (safe under bf16 autocast). As an SFT loss: -sequence_logps(...).sum() / number of targets.

    Args:
        logits: unnormalised next-token scores. Shape: (batch_size, seq_len, vocab_size)
        labels: integer targets aligned with the inputs, `ignore_index` where unscored. Shape: (batch_size, seq_len)
        ignore_index: label value of the positions to skip (-100, as in PyTorch and HF).

    Returns:
        Summed (not averaged) log-probs of the labelled tokens, float32; 0 for a sequence
        without labelled tokens. Shape: (batch_size,)
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 3:
        raise ValueError("logits must be a floating-point tensor of shape (batch_size, seq_len, vocab_size)")
    if (not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool or labels.shape != logits.shape[:-1]):
        raise ValueError(f"labels must be an integer tensor of shape {tuple(logits.shape[:-1])} (logits without V)")
    logits = logits[:, :-1, :].float()                      # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]                                  # (B, T-1)
    mask = labels != ignore_index                           # (B, T-1)
    index = labels.masked_fill(~mask, 0).long()             # (B, T-1), a dummy id where ignored
    if ((index < 0) | (index >= logits.size(-1))).any():
        raise ValueError(f"labels must lie in [0, vocab_size={logits.size(-1)}) or equal ignore_index={ignore_index}")
    # log_softmax(logits)[label] = logit[label] - logsumexp(logits), without a (B, T-1, V) log-prob copy
    per_token = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
    # where() rather than `* mask`: a -inf logit at an ignored position must not become 0 * -inf = nan
    return torch.where(mask, per_token, 0.0).sum(-1)        # (B,)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023) and, with label_smoothing = eps > 0, conservative DPO (cDPO).

        loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    eps = 0 is Eq. 7 of arXiv:2305.18290. eps > 0 assumes each label is flipped with probability
    eps (Eq. 3 of ericmitchell.ai/cdpo.pdf; TRL's "sigmoid" loss with label_smoothing). In general
    loss(h) - loss(-h) = -(1 - 2 eps) * beta * h, so eps = 0.5 would make the loss symmetric in the
    sign of h (the labels carry no information; it only pulls every margin to 0): it is rejected.

    Args:
        policy_chosen_logps: log pi(yw|x), summed over response tokens. Shape: (batch_size,)
        policy_rejected_logps: log pi(yl|x). Shape: (batch_size,)
        reference_chosen_logps: log ref(yw|x) under the frozen reference model. Shape: (batch_size,)
        reference_rejected_logps: log ref(yl|x). Shape: (batch_size,)
        beta: strength of the implicit KL penalty, > 0 (0.1 in the paper).
        label_smoothing: eps in [0, 0.5), the assumed label-flip probability.

    Returns:
        losses: Shape: (batch_size,)
        chosen_rewards: beta * (log pi(yw|x) - log ref(yw|x)), detached. Shape: (batch_size,)
        rejected_rewards: beta * (log pi(yl|x) - log ref(yl|x)), detached. Shape: (batch_size,)
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps)
    _check_number("beta", beta, 0, math.inf, True, True)
    _check_number("label_smoothing", label_smoothing, 0, 0.5, False, True)
    h = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)  # (B,)
    # Eq. 7 of arXiv:2305.18290 (eps = 0) / Eq. 3 of the cDPO note; logsigmoid, never log(sigmoid), for stability
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)  # (B,)
    chosen_rewards = _rewards(beta, policy_chosen_logps, reference_chosen_logps)
    rejected_rewards = _rewards(beta, policy_rejected_logps, reference_rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def mdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              policy_corrupted_chosen_logps, reference_corrupted_chosen_logps, beta=0.1, anchor=0.0,
              use_conditional=True, use_anchor=True):
    """mDPO (Wang et al. 2024, arXiv:2406.11839): three equally weighted terms sharing one beta.

    m = the real condition (image), m~ = the corrupted one; yw is used on BOTH sides of L_CoPO;
    log pi(y|m) is the summed log-prob of y given m (and the prompt x) under the policy:

        L_DPO   = -log sigma(beta * [(log pi(yw|m) - log pi(yl|m))  - (log ref(yw|m) - log ref(yl|m))])   Eq. 1
        L_CoPO  = -log sigma(beta * [(log pi(yw|m) - log pi(yw|m~)) - (log ref(yw|m) - log ref(yw|m~))])  Eq. 2
        L_AncPO = -log sigma(beta * (log pi(yw|m) - log ref(yw|m)) - delta)                               Eq. 3
        loss    = L_DPO + L_CoPO + L_AncPO                                                                Eq. 4

    L_DPO is standard DPO. L_CoPO (conditional preference) makes the chosen answer more likely
    with the real condition than with the corrupted one; L_AncPO (anchored preference) pushes the
    chosen reward above delta (0 in the released code, which has no delta), so the chosen log-prob
    is not dragged down. The Table 2 ablations of the paper are `use_conditional=False`
    (L_DPO + L_AncPO; the corrupted log-probs may then be None) and `use_anchor=False` (L_DPO + L_CoPO).

    The corrupted condition m~ must be the SAME image for the policy and the reference, or L_CoPO
    subtracts log-probs of two different inputs. In the released code it is not: the crop is drawn
    inside the model's forward (mDPOBunnyPhiForCausalLM.forward(mask_visual_tokens=True) calls
    crop_images, a fresh v2.RandomResizedCrop(scale=(0.01, 0.2)) per image and per call), so the
    policy pass and the reference pass each see their own random crop. This project fixes that:
    one crop per pair, drawn once with the data (pref.build_pairs) and shared by the policy and the
    reference. This function only sees log-probs: sharing m~ is the caller's job.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            as in `dpo_loss`, under the real condition m. Shape: (batch_size,)
        policy_corrupted_chosen_logps: log pi(yw|m~, x), same chosen response, corrupted condition
            (a corrupted image, or a corrupted prompt for generation). Shape: (batch_size,)
        reference_corrupted_chosen_logps: log ref(yw|m~, x); the reference must see the SAME
            corrupted condition as the policy. Shape: (batch_size,)
        beta: shared by the three terms, > 0. anchor: delta.
        use_conditional, use_anchor: keep L_CoPO / L_AncPO (the paper's ablations switch one off).

    Returns:
        losses: the sum of the kept terms. Shape: (batch_size,)
        chosen_rewards, rejected_rewards: as in `dpo_loss`. Shape: (batch_size,)
        corrupted_chosen_rewards: beta * (log pi(yw|m~) - log ref(yw|m~)), detached, logged as
            rewards/imageless_chosen by the authors; None if the corrupted log-probs are None.
    """
    logps = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps)
    corrupted = dict(policy_corrupted_chosen_logps=policy_corrupted_chosen_logps,
                     reference_corrupted_chosen_logps=reference_corrupted_chosen_logps)
    if use_conditional or any(v is not None for v in corrupted.values()):
        logps.update(corrupted)
    _check_logps(**logps)
    _check_number("beta", beta, 0, math.inf, True, True)
    _check_number("anchor", anchor, -math.inf, math.inf, True, True)
    # L_DPO, Eq. 1 of arXiv:2406.11839 (Eq. 7 of arXiv:2305.18290)
    h = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)  # (B,)
    losses = -F.logsigmoid(beta * h)                                                        # (B,)
    if use_conditional:
        # L_CoPO, Eq. 2: a DPO margin whose "rejected" side is the chosen response under m~
        h_cond = _margin(policy_chosen_logps, policy_corrupted_chosen_logps,
                         reference_chosen_logps, reference_corrupted_chosen_logps)        # (B,)
        losses = losses - F.logsigmoid(beta * h_cond)
    if use_anchor:
        # L_AncPO, Eq. 3: anchor the chosen reward beta * log pi(yw|m)/ref(yw|m) at delta
        losses = losses - F.logsigmoid(beta * (policy_chosen_logps - reference_chosen_logps) - anchor)
    corrupted_chosen_rewards = None
    if policy_corrupted_chosen_logps is not None:
        corrupted_chosen_rewards = _rewards(beta, policy_corrupted_chosen_logps, reference_corrupted_chosen_logps)
    return (losses, _rewards(beta, policy_chosen_logps, reference_chosen_logps),
            _rewards(beta, policy_rejected_logps, reference_rejected_logps), corrupted_chosen_rewards)


def dama_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              chosen_scores, rejected_scores, gap_mean, beta=0.1, score_gap_mean=0.0, keep_ratio=0.8,
              momentum=0.9, generator=None, keep_indices=None):
    """DAMA (Lu et al. 2025, arXiv:2502.01943): DPO with a per-sample beta_i = beta * alpha_D_i * alpha_M.

        R_i       = h_i, the DPO margin, NOT scaled by beta                          Eq. 8
        alpha_D_i = sigma(cw_i - cl_i) / sigma(score_gap_mean)     data-aware factor, Eq. 6
        w_i       = exp(-(h_i - gap_mean)^2 / 2); draw K = int(N * keep_ratio) indices S
                    without replacement with probability ~ w                      Eq. 9-11
        alpha_M   = mean_{i in S} sigma(h_i) / sigma(gap_mean)     model-aware factor, Eq. 12
        beta_i    = clamp(beta * alpha_D_i * alpha_M, min=1e-3)    beta_C, Eq. 15-16 (+ the code's clamp)
        losses_i  = -log sigma(beta_i * h_i)                       DPO loss with beta_C, Eq. 2
        gap_mean <- momentum * gap_mean + (1 - momentum) * mean_i h_i  (all N samples), Eq. 14

    The batch loss counts only the kept samples: loss = (losses * keep_mask).sum() / keep_mask.sum().
    Eq. 12 and 14 are written with the batch gap R_B; we follow the released code, which averages
    sigma(h_i) over S for alpha_M and h over the whole batch for the update. As there, S and beta_i
    come from detached margins (`A_gap.detach()`), so beta_i carries no gradient: a per-sample
    constant, like beta in DPO. Rewards use the base beta. Start at gap_mean = 0 and pass
    new_gap_mean to the next TRAINING step (the released compute_loss updates it on every call).
    The min=1e-3 clamp on beta_i exists only in the released code (`beta_used.clamp(min=1e-3)`);
    Eq. 15-16 and Algorithm 1 of the paper have no floor. We keep it: without it a tiny alpha_D or
    alpha_M sends beta_i, and with it the gradient of that sample, to ~0.

    Deviations from injadlu/DAMA train_dpo.py `dpo_loss` (identical in the common case):
      * Fewer than K weights > 0 (exp underflows once |h - gap_mean| > ~14 in float32, ~38 in
        float64): there torch.multinomial(w, K, replacement=False) does NOT raise. It silently
        fills the shortfall with zero-weight indices in a fixed order, the same for every seed
        (checked on torch 2.13.0, CPU: w = [0, 1, 0, 0, .5, 0, 0], K = 7 gives [1, 4, 6, 0, 5, 3, 2]
        for every seed), so the same w = 0 samples are kept every time. If ALL are 0 the released
        code uses random.choices instead: WITH replacement and outside the torch seed. Here every
        w > 0 sample is kept and the rest drawn uniformly WITHOUT replacement from the w = 0 ones
        (the limit of w + eps): all 0 means uniform.
      * K = max(1, int(N * keep_ratio)); with N = 1 the released code keeps nobody (NaN alpha_M).
      * alpha_D, alpha_M are exp of log-sigmoid differences: the same number, but no 0 / 0 when
        sigma(h) and sigma(gap_mean) both underflow. (alpha_M is not capped: if sigma(gap_mean) is
        ~e^-88 times the kept mean, beta_i overflows, as it does in the released code.)
      * S is drawn from this batch, not from the batch all-gathered over GPUs; the released code's
        EMAs of the gap std and of the loss never reach the loss and are left out.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            as in `dpo_loss`. Shape: (batch_size,)
        chosen_scores, rejected_scores: cw, cl: the image-text (CLIP) score of the chosen / rejected
            response, summed over its sub-sentences. Shape: (batch_size,)
        gap_mean: running mean of h (R-bar): a python float or a 0-dim floating tensor.
        beta: base beta, > 0.
        score_gap_mean: dbar, the mean of cw - cl over YOUR preference pairs, measured once before
            training (this project measures it on its own pairs in pref.preference_data). The
            released code hard-codes 0.0482190464911681: a property of the authors' data and CLIP
            scorer, not of the method, so it is not the default. The default 0.0 needs no data and
            gives sigma(dbar) = 0.5, i.e. alpha_D = sigma(cw - cl) / 0.5 (1 for a tie cw = cl).
        keep_ratio: in (0, 1], 1.0 keeps all. momentum: EMA decay in [0, 1].
        generator: torch.Generator on the inputs' device, for a reproducible selection.
        keep_indices: indices S to keep instead of drawing them (deterministic tests).

    Returns:
        losses: -log sigma(beta_i h_i) for EVERY sample; reduce with keep_mask. Shape: (batch_size,)
        chosen_rewards, rejected_rewards: as in `dpo_loss`. Shape: (batch_size,)
        beta_used: beta_i, detached, in at least float32. Shape: (batch_size,)
        keep_mask: 1.0 for the kept samples, else 0.0. Shape: (batch_size,)
        new_gap_mean: a float if gap_mean was a float, else a detached 0-dim tensor like gap_mean.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
                 chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    if isinstance(gap_mean, torch.Tensor):
        if gap_mean.ndim != 0 or not gap_mean.is_floating_point():
            raise ValueError(f"gap_mean must be a float or a 0-dim float tensor, got shape {tuple(gap_mean.shape)}")
    else:
        _check_number("gap_mean", gap_mean, -math.inf, math.inf, True, True)
    _check_number("beta", beta, 0, math.inf, True, True)
    _check_number("score_gap_mean", score_gap_mean, -math.inf, math.inf, True, True)
    _check_number("keep_ratio", keep_ratio, 0, 1, True, False)
    _check_number("momentum", momentum, 0, 1, False, False)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    h = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)  # (B,)
    n = h.numel()
    with torch.no_grad():  # selection and beta_i carry no gradient, as in the released code
        h_d = h.detach().to(torch.promote_types(h.dtype, torch.float32))                # (B,)
        gap = torch.as_tensor(gap_mean, dtype=h_d.dtype, device=h_d.device).detach()     # ()
        if keep_indices is None:
            k = max(1, int(n * keep_ratio))
            w = torch.exp(-0.5 * (h_d - gap) ** 2)  # (B,) closeness to the running mean gap, Eq. 9-11
            if int((w > 0).sum()) >= k:
                keep_indices = torch.multinomial(w, k, replacement=False, generator=generator)  # (K,)
            else:  # DEVIATION (see docstring): positive weights first, the rest uniform, no replacement
                positive, zero = torch.nonzero(w > 0).flatten(), torch.nonzero(w == 0).flatten()
                pick = torch.randperm(zero.numel(), generator=generator, device=zero.device)[: k - positive.numel()]
                keep_indices = torch.cat([positive, zero[pick]])                          # (K,)
        elif (not isinstance(keep_indices, torch.Tensor) or keep_indices.is_floating_point()
              or keep_indices.dtype == torch.bool or keep_indices.ndim != 1 or keep_indices.numel() == 0
              or keep_indices.unique().numel() != keep_indices.numel() or keep_indices.min() < 0 or keep_indices.max() >= n):
            raise ValueError(f"keep_indices must be a non-empty 1-D integer tensor of distinct indices in [0, {n})")
        keep_indices = keep_indices.to(h_d.device, torch.long)
        keep_mask = torch.zeros_like(h_d)
        keep_mask[keep_indices] = 1.0                                                     # (B,)
        # alpha_D, Eq. 6: sigma(cw - cl) / sigma(dbar), dbar = score_gap_mean, in log space
        score_gap = (chosen_scores - rejected_scores).detach().to(h_d.dtype)              # (B,)
        dbar = torch.tensor(float(score_gap_mean), dtype=h_d.dtype, device=h_d.device)   # ()
        log_alpha_D = F.logsigmoid(score_gap) - F.logsigmoid(dbar)                        # (B,)
        # alpha_M, Eq. 12: mean over S of sigma(h_i), over sigma(R-bar), in log space
        log_mean_sigmoid = torch.logsumexp(F.logsigmoid(h_d[keep_indices]), 0) - math.log(keep_indices.numel())
        log_alpha_M = log_mean_sigmoid - F.logsigmoid(gap)                                 # ()
        # (B,) beta_C, Eq. 15-16; the min=1e-3 clamp is the released code's, not in the paper
        beta_used = (beta * torch.exp(log_alpha_D + log_alpha_M)).clamp(min=1e-3)         # (B,)
    losses = -F.logsigmoid(beta_used * h)                      # (B,) Eq. 2 of arXiv:2502.01943 with beta_C
    # Eq. 14: EMA of the mean margin over ALL samples of the batch, updated after the step
    if isinstance(gap_mean, torch.Tensor):
        new_gap_mean = (momentum * gap_mean.detach() + (1 - momentum) * h_d.mean().to(gap_mean)).detach()
    else:
        new_gap_mean = momentum * float(gap_mean) + (1 - momentum) * h_d.mean().item()
    return (losses, _rewards(beta, policy_chosen_logps, reference_chosen_logps),
            _rewards(beta, policy_rejected_logps, reference_rejected_logps), beta_used, keep_mask, new_gap_mean)


def chosen_nll_loss(policy_chosen_logps, chosen_lengths):
    """The NLL term of RPO (Pang et al. 2024, arXiv:2404.19733, Eq. 1), per pair:

        nll_i = -log pi(yw_i) / |yw_i|        (the chosen response's mean token cross-entropy)

    added to a preference loss as `losses + alpha * nll` (RPO's alpha = 1; TRL's `rpo_alpha`).
    It pulls log pi(yw) UP, which plain DPO lets fall with log pi(yl): the usual remedy for the
    alignment tax. The paper divides by the response's length, so a long chosen response weighs
    like a short one; TRL instead pools the tokens of the whole batch (one mean over all chosen
    tokens). Both are the same for equal lengths.

    Args:
        policy_chosen_logps: summed log pi(yw), as for the losses above. Shape: (B,)
        chosen_lengths: scored tokens of each chosen response (>= 1). Shape: (B,)
    Returns: per-pair NLL, shape (B,), with the gradient of policy_chosen_logps.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps)
    if not isinstance(chosen_lengths, torch.Tensor) or chosen_lengths.shape != policy_chosen_logps.shape:
        raise ValueError(f"chosen_lengths must be a tensor of shape {tuple(policy_chosen_logps.shape)}")
    if (chosen_lengths < 1).any():
        raise ValueError("chosen_lengths must be >= 1 (a chosen response with no scored token)")
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)   # (B,)


def preference_metrics(chosen_rewards, rejected_rewards):
    """Batch means under TRL's names. Accuracy counts chosen > rejected STRICTLY, so it is 0 at step 0."""
    _check_logps(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()  # (B,)
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item()}
