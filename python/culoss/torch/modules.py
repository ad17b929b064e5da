"""``torch.nn`` loss modules backed by culoss: one per functional op, with
torch's constructor arguments (culoss extras keyword-only, off by default)."""
import torch
from torch import nn

from . import functional as F

__all__ = [
    "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss", "MultiMarginLoss", "MSELoss",
    "L1Loss", "HuberLoss", "SmoothL1Loss", "KLDivLoss", "HingeLoss", "LinearCrossEntropyLoss",
    "HingeEmbeddingLoss", "SoftMarginLoss", "PoissonNLLLoss", "SigmoidFocalLoss",
    "MarginRankingLoss", "GaussianNLLLoss", "CosineEmbeddingLoss", "TripletMarginLoss",
    "MultiLabelSoftMarginLoss", "MultiLabelMarginLoss", "InfoNCELoss", "GeneralizedJSDLoss",
    "TVDLoss", "LinearGeneralizedJSDLoss",
]


def _reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


class _Loss(nn.Module):
    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        super().__init__()
        self.reduction = _reduction(size_average, reduce, reduction)


class _WeightedLoss(_Loss):
    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.weight: torch.Tensor | None


class CrossEntropyLoss(_WeightedLoss):
    """``torch.nn.CrossEntropyLoss`` on culoss's fused kernel (see
    :func:`culoss.torch.cross_entropy`)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, logit_softcap=0.0,
                 inplace_backward=False):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss, self.logit_softcap = z_loss, logit_softcap
        self.inplace_backward = inplace_backward

    def forward(self, input, target, normalizer=None):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, logit_softcap=self.logit_softcap,
                               normalizer=normalizer, inplace_backward=self.inplace_backward)


class NLLLoss(_WeightedLoss):
    """``torch.nn.NLLLoss`` (see :func:`culoss.torch.nll_loss`)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean"):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input, target):
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """``torch.nn.BCEWithLogitsLoss``."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class BCELoss(_WeightedLoss):
    """``torch.nn.BCELoss``."""

    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class MultiMarginLoss(_WeightedLoss):
    """``torch.nn.MultiMarginLoss``."""

    def __init__(self, p=1, margin=1.0, weight=None, size_average=None, reduce=None,
                 reduction="mean"):
        super().__init__(weight, size_average, reduce, reduction)
        if p != 1 and p != 2:
            raise ValueError("only p == 1 and p == 2 supported")
        if weight is not None and weight.dim() != 1:
            raise ValueError(f"MultiMarginLoss: expected weight to be None or 1D tensor, got "
                             f"{weight.dim()}D instead")
        self.p, self.margin = p, margin

    def forward(self, input, target):
        return F.multi_margin_loss(input, target, p=self.p, margin=self.margin,
                                   weight=self.weight, reduction=self.reduction)


class MSELoss(_Loss):
    """``torch.nn.MSELoss``."""

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(_Loss):
    """``torch.nn.L1Loss``."""

    def forward(self, input, target):
        return F.l1_loss(input, target, reduction=self.reduction)


class HuberLoss(_Loss):
    """``torch.nn.HuberLoss``."""

    def __init__(self, reduction="mean", delta=1.0):
        super().__init__(reduction=reduction)
        self.delta = delta

    def forward(self, input, target):
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class SmoothL1Loss(_Loss):
    """``torch.nn.SmoothL1Loss``."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input, target):
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class KLDivLoss(_Loss):
    """``torch.nn.KLDivLoss``."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", log_target=False):
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input, target):
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class HingeLoss(_Loss):
    """Binary hinge (culoss's own; see :func:`culoss.torch.hinge_loss`)."""

    def __init__(self, margin=1.0, squared=False, reduction="mean"):
        super().__init__(reduction=reduction)
        self.margin, self.squared = margin, squared

    def forward(self, input, target):
        return F.hinge_loss(input, target, margin=self.margin, squared=self.squared,
                            reduction=self.reduction)


class HingeEmbeddingLoss(_Loss):
    """``torch.nn.HingeEmbeddingLoss`` (see :func:`culoss.torch.hinge_embedding_loss`)."""

    def __init__(self, margin=1.0, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input, target):
        return F.hinge_embedding_loss(input, target, margin=self.margin, reduction=self.reduction)


class SoftMarginLoss(_Loss):
    """``torch.nn.SoftMarginLoss``, overflow-free (see :func:`culoss.torch.soft_margin_loss`)."""

    def forward(self, input, target):
        return F.soft_margin_loss(input, target, reduction=self.reduction)


class PoissonNLLLoss(_Loss):
    """``torch.nn.PoissonNLLLoss`` (see :func:`culoss.torch.poisson_nll_loss`)."""

    def __init__(self, log_input=True, full=False, size_average=None, eps=1e-8, reduce=None,
                 reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.log_input, self.full, self.eps = log_input, full, eps

    def forward(self, log_input, target):
        return F.poisson_nll_loss(log_input, target, log_input=self.log_input, full=self.full,
                                  eps=self.eps, reduction=self.reduction)


class SigmoidFocalLoss(nn.Module):
    """torchvision's focal loss as a module (see :func:`culoss.torch.sigmoid_focal_loss`)."""

    def __init__(self, alpha=0.25, gamma=2.0, reduction="none"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, inputs, targets):
        return F.sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma,
                                    reduction=self.reduction)


class MarginRankingLoss(_Loss):
    """``torch.nn.MarginRankingLoss`` (see :func:`culoss.torch.margin_ranking_loss`)."""

    def __init__(self, margin=0.0, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input1, input2, target):
        return F.margin_ranking_loss(input1, input2, target, margin=self.margin,
                                     reduction=self.reduction)


class GaussianNLLLoss(_Loss):
    """``torch.nn.GaussianNLLLoss`` (see :func:`culoss.torch.gaussian_nll_loss`)."""

    def __init__(self, *, full=False, eps=1e-6, reduction="mean"):
        super().__init__(None, None, reduction)
        self.full, self.eps = full, eps

    def forward(self, input, target, var):
        return F.gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps,
                                   reduction=self.reduction)


class CosineEmbeddingLoss(_Loss):
    """``torch.nn.CosineEmbeddingLoss`` (see :func:`culoss.torch.cosine_embedding_loss`)."""

    def __init__(self, margin=0.0, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input1, input2, target):
        return F.cosine_embedding_loss(input1, input2, target, margin=self.margin,
                                       reduction=self.reduction)


class TripletMarginLoss(_Loss):
    """``torch.nn.TripletMarginLoss`` (see :func:`culoss.torch.triplet_margin_loss`)."""

    def __init__(self, margin=1.0, p=2.0, eps=1e-6, swap=False, size_average=None, reduce=None,
                 reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        if margin <= 0:
            raise ValueError(f"TripletMarginLoss: expected margin to be greater than 0, got "
                             f"{margin} instead")
        self.margin, self.p, self.eps, self.swap = margin, p, eps, swap

    def forward(self, anchor, positive, negative):
        return F.triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=self.p,
                                     eps=self.eps, swap=self.swap, reduction=self.reduction)


class MultiLabelSoftMarginLoss(_WeightedLoss):
    """``torch.nn.MultiLabelSoftMarginLoss`` (see
    :func:`culoss.torch.multilabel_soft_margin_loss`)."""

    def forward(self, input, target):
        return F.multilabel_soft_margin_loss(input, target, weight=self.weight,
                                             reduction=self.reduction)


class MultiLabelMarginLoss(_Loss):
    """``torch.nn.MultiLabelMarginLoss`` (see :func:`culoss.torch.multilabel_margin_loss`)."""

    def forward(self, input, target):
        return F.multilabel_margin_loss(input, target, reduction=self.reduction)


class InfoNCELoss(nn.Module):
    """Contrastive InfoNCE / CLIP loss as a module (see
    :func:`culoss.torch.info_nce_loss`): ``forward(query, key)``; the
    temperature a float or a tensor (a learned one may be a parameter of the
    caller's model)."""

    def __init__(self, *, temperature=1.0, symmetric=False, reduction="mean"):
        super().__init__()
        self.temperature, self.symmetric, self.reduction = temperature, symmetric, reduction

    def forward(self, query, key):
        return F.info_nce_loss(query, key, temperature=self.temperature,
                               symmetric=self.symmetric, reduction=self.reduction)


class LinearCrossEntropyLoss(nn.Module):
    """Fused linear + cross-entropy as a module (see
    :func:`culoss.torch.linear_cross_entropy`): the loss options in the
    constructor, the projection in ``forward(input, linear_weight, target,
    linear_bias=None)``.

    Unlike ``torch.nn.LinearCrossEntropyLoss``, which owns its weight, this
    module holds no parameters: the LM head's weight belongs to the model (it
    is often tied to the embedding), as in Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss``::

        loss_fn = LinearCrossEntropyLoss(ignore_index=-100)
        loss = loss_fn(hidden.view(-1, d), model.lm_head.weight, labels.view(-1))
    """

    def __init__(self, *, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 options=None, z_loss=0.0, logit_softcap=0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index = reduction, ignore_index
        self.label_smoothing, self.options = label_smoothing, options
        self.z_loss, self.logit_softcap = z_loss, logit_softcap

    def forward(self, input, linear_weight, target, linear_bias=None, normalizer=None):
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                      weight=self.weight, reduction=self.reduction,
                                      ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing,
                                      z_loss=self.z_loss, logit_softcap=self.logit_softcap,
                                      normalizer=normalizer)


class GeneralizedJSDLoss(nn.Module):
    """Generalized JSD between teacher and student logits as a module (see
    :func:`culoss.torch.generalized_jsd_loss`): the options in the
    constructor, ``forward(student_logits, teacher_logits, labels=None)``."""

    def __init__(self, *, beta=0.5, temperature=1.0, ignore_index=-100, reduction="batchmean"):
        super().__init__()
        self.beta, self.temperature = beta, temperature
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, student_logits, teacher_logits, labels=None):
        return F.generalized_jsd_loss(student_logits, teacher_logits, labels, beta=self.beta,
                                      temperature=self.temperature,
                                      ignore_index=self.ignore_index, reduction=self.reduction)


class TVDLoss(nn.Module):
    """Total variation distance between teacher and student logits as a
    module (see :func:`culoss.torch.tvd_loss`)."""

    def __init__(self, *, temperature=1.0, ignore_index=-100, reduction="batchmean"):
        super().__init__()
        self.temperature, self.ignore_index, self.reduction = temperature, ignore_index, reduction

    def forward(self, student_logits, teacher_logits, labels=None):
        return F.tvd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                          ignore_index=self.ignore_index, reduction=self.reduction)


class LinearGeneralizedJSDLoss(nn.Module):
    """Fused linear + generalized JSD as a module (see
    :func:`culoss.torch.linear_generalized_jsd_loss`): ``forward(student_input,
    student_weight, teacher_input, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None)``."""

    def __init__(self, *, beta=0.5, temperature=1.0, ignore_index=-100, reduction="batchmean",
                 weight_hard_loss=0.0, weight_soft_loss=1.0, hard_label_smoothing=0.0,
                 hard_class_weight=None, hard_z_loss=0.0):
        super().__init__()
        self.beta, self.temperature = beta, temperature
        self.ignore_index, self.reduction = ignore_index, reduction
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.hard_label_smoothing, self.hard_z_loss = hard_label_smoothing, hard_z_loss
        # a buffer, as nn.CrossEntropyLoss's weight: it follows .to(device)
        self.register_buffer("hard_class_weight", hard_class_weight)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None):
        return F.linear_generalized_jsd_loss(
            student_input, student_weight, teacher_input, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, beta=self.beta,
            temperature=self.temperature, ignore_index=self.ignore_index,
            reduction=self.reduction, weight_hard_loss=self.weight_hard_loss,
            weight_soft_loss=self.weight_soft_loss, hard_label_smoothing=self.hard_label_smoothing,
            hard_class_weight=self.hard_class_weight, hard_z_loss=self.hard_z_loss)
