"""Mask2Former set criterion: Hungarian matching of predicted masks to targets and the set loss.

Shared by the PMP head (:mod:`vlmkit.seg.pmp`, binary proposal scores) and FrozenSeg
(:mod:`vlmkit.seg.frozenseg`, open-vocabulary class logits); both feed it a
:class:`~vlmkit.seg.pmp.PMPDecoder` result (``pred_masks``, ``pred_logits`` or ``pred_scores``,
``aux_outputs``). :func:`hungarian_match` is a minimum-cost one-to-one matching (scipy's
``linear_sum_assignment`` when installed, a greedy matcher otherwise); :func:`set_criterion` matches each
prediction set with Mask2Former's costs (mask BCE + dice + class) and returns the weighted mask BCE,
dice and class cross-entropy (or binary proposal-score BCE) losses. Depends on torch only (and scipy
when present), so it imports on its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["hungarian_match", "set_criterion"]


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy is a dependency; the greedy matcher is the fallback
        return None
    return linear_sum_assignment


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one matching of cost [Q, N]: (query indices, target indices), by target order.

    Uses ``scipy.optimize.linear_sum_assignment`` when scipy is installed; otherwise a greedy matcher
    (repeatedly take the cheapest remaining pair), which is optimal only when the pairs do not compete.
    """
    Q, N = cost.shape
    if Q == 0 or N == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    lsa = _linear_sum_assignment()
    c = cost.detach().float().cpu()
    if lsa is not None:
        rows, cols = lsa(c.numpy())
        rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    else:
        return _greedy_match(c)
    order = torch.argsort(cols)
    return rows[order], cols[order]


def _greedy_match(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = c.clone()
    rows, cols = [], []
    for _ in range(min(c.shape)):
        flat = int(torch.argmin(c))
        r, k = divmod(flat, c.shape[1])
        rows.append(r)
        cols.append(k)
        c[r, :] = float("inf")
        c[:, k] = float("inf")
    rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    order = torch.argsort(cols_t)
    return rows_t[order], cols_t[order]


def _pair_bce(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel sigmoid BCE of every prediction [Q, P] with every target [N, P]: [Q, N]."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ tgt.T + neg @ (1 - tgt).T) / pred.shape[-1]


def _pair_dice(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    p = pred.sigmoid()
    return 1 - (2 * p @ tgt.T + 1) / (p.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)


def _dice_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    p = pred.sigmoid()
    return 1 - (2 * (p * tgt).sum(-1) + 1) / (p.sum(-1) + tgt.sum(-1) + 1)


def set_criterion(
    outputs: dict[str, Any],
    targets: Sequence[dict[str, torch.Tensor]],
    *,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    no_object_weight: float = 0.1,
    deep_supervision: bool = True,
    resolution: str = "prediction",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mask2Former set loss of ``outputs`` (a :class:`PMPDecoder` result) against per-sample targets.

    ``targets[b]``: ``masks`` [N_b, H, W] (bool/float) and, for class logits, ``labels`` [N_b] (index into
    the classes of ``pred_logits``; the last logit is void / no-object). With ``pred_logits`` the class
    term is a cross-entropy with weight ``no_object_weight`` on void; else ``pred_scores`` [B, Q] get a
    BCE (matched → 1, others → 0, unmatched weighted ``no_object_weight``). ``resolution``:
    ``"prediction"`` resizes targets to the mask logits (bilinear with antialias, soft targets);
    ``"target"`` upsamples the logits to each target's size. Each prediction set (final and, with
    ``deep_supervision``, every ``aux_outputs`` entry) is matched on its own; masks are averaged over the
    number of target masks in the batch (at least 1). Returns (total, components of the final set).
    """
    if resolution not in ("prediction", "target"):
        raise ValueError(f"resolution must be 'prediction' or 'target', got {resolution!r}")
    sets = [outputs] + (list(outputs.get("aux_outputs", [])) if deep_supervision else [])
    B = outputs["pred_masks"].shape[0]
    if len(targets) != B:
        raise ValueError(f"got {len(targets)} target entries for a batch of {B}")
    use_classes = "pred_logits" in outputs
    if not use_classes and "pred_scores" not in outputs:
        raise ValueError("outputs need 'pred_logits' (class head) or 'pred_scores' (score head) for the loss")
    num_masks = max(sum(int(t["masks"].shape[0]) for t in targets), 1)
    total = outputs["pred_masks"].new_zeros(())
    final: dict[str, torch.Tensor] = {}
    for k, pred in enumerate(sets):
        cls_terms, bce_sum, dice_sum = [], total.new_zeros(()), total.new_zeros(())
        for b, tgt in enumerate(targets):
            pm = pred["pred_masks"][b]  # [Q, h, w]
            Q = pm.shape[0]
            tm = tgt["masks"].to(pm.device, pm.dtype)
            N = tm.shape[0]
            if N and resolution == "target":
                pm = F.interpolate(pm[None], size=tm.shape[-2:], mode="bilinear", align_corners=False)[0]
            elif N and tm.shape[-2:] != pm.shape[-2:]:
                tm = F.interpolate(tm[None], size=pm.shape[-2:], mode="bilinear", align_corners=False, antialias=True)[0]
            pf, tf = pm.flatten(1), tm.flatten(1)
            if use_classes:
                logits = pred["pred_logits"][b]  # [Q, K + 1]
                labels = tgt["labels"].to(logits.device).long()
                if labels.shape != (N,):
                    raise ValueError(f"target {b}: labels must be [N={N}], got shape {tuple(labels.shape)}")
                if N and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1] - 1):
                    raise ValueError(f"target {b}: labels must lie in [0, {logits.shape[-1] - 2}], got {labels.tolist()}")
                cost_cls = -logits.softmax(-1)[:, labels] if N else None
            else:
                scores = pred["pred_scores"][b]  # [Q]
                cost_cls = -scores.sigmoid()[:, None].expand(Q, N) if N else None
            if N:
                with torch.no_grad():
                    cost = (mask_weight * _pair_bce(pf.float(), tf.float()) + dice_weight * _pair_dice(pf.float(), tf.float())
                            + class_weight * cost_cls.float())
                qi, ti = hungarian_match(cost)
                qi, ti = qi.to(pm.device), ti.to(pm.device)
                bce_sum = bce_sum + F.binary_cross_entropy_with_logits(pf[qi], tf[ti], reduction="none").mean(-1).sum()
                dice_sum = dice_sum + _dice_loss(pf[qi], tf[ti]).sum()
            else:
                qi = ti = torch.zeros(0, dtype=torch.long, device=pm.device)
            if use_classes:
                K1 = logits.shape[-1]
                target_cls = torch.full((Q,), K1 - 1, dtype=torch.long, device=logits.device)
                target_cls[qi] = labels[ti]
                cls_terms.append((logits, target_cls))
            else:
                target = torch.zeros(Q, device=scores.device, dtype=scores.dtype)
                target[qi] = 1.0
                cls_terms.append((scores, target))
        if use_classes:
            logits = torch.cat([t[0] for t in cls_terms])
            tgt_cls = torch.cat([t[1] for t in cls_terms])
            weight = torch.ones(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            weight[-1] = no_object_weight
            loss_cls = F.cross_entropy(logits, tgt_cls, weight=weight)
        else:
            scores = torch.cat([t[0] for t in cls_terms])
            tgt = torch.cat([t[1] for t in cls_terms])
            w = torch.where(tgt > 0, torch.ones_like(tgt), torch.full_like(tgt, no_object_weight))
            loss_cls = (F.binary_cross_entropy_with_logits(scores, tgt, reduction="none") * w).sum() / w.sum()
        loss_mask, loss_dice = bce_sum / num_masks, dice_sum / num_masks
        total = total + class_weight * loss_cls + mask_weight * loss_mask + dice_weight * loss_dice
        if k == 0:
            final = {"loss_class": loss_cls.detach(), "loss_mask": loss_mask.detach(), "loss_dice": loss_dice.detach()}
    return total, final
