"""The one form every margin follows (docs/heads.md).

A margin turns the cosines of a batch to the class centers it is given into logits::

    logit_y = scale * T(cos_y)        logit_j = scale * N(cos_j, T(cos_y))   (j != y)

It never owns or touches the class-center weight: a class-center store
(``facetrain.classifiers``: one dense matrix, or Partial-FC shards over many ranks) computes the
cosines, hands them over as ``CenterCosines`` and takes the cross-entropy of the logits. That is
what lets every cosine margin run on one GPU or on millions of identities.

A margin says only what differs (``target_logit``, ``hard_negative_logit`` or
``non_target_logit``, ``logit_scale``, and ``update_state`` for margins with state);
``Margin.logits`` does the target scatter. It is the reference form: in training the stores run
the same math as one fused node (``facetrain.classifiers.fused``) for every margin whose
``fused_epilogue`` is true. State (running averages, iteration counters) lives in registered
buffers, so it is saved in checkpoints and restored on resume. An extra loss term (MagFace's
regulariser, NormFace's agent losses, ``extra_term``) is returned by ``extra_loss()`` after a
training forward; the module adds it to the cross-entropy and logs it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Cosines are kept this far inside [-1, 1] so that acos and sqrt(1 - cos^2) have finite gradients.
COS_EPS = 1e-7

# Sums a small tensor over the ranks whose rows together make up the global batch (identity on
# one process, or where every rank already sees the global batch, as under Partial-FC).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def additive_angular_margin(cos_y: torch.Tensor, margin) -> torch.Tensor:
    """``cos(theta + m)`` where ``theta + m <= pi``, else insightface's fallback
    ``cos - m·sin(m)``, so the target logit keeps decreasing in theta. ``margin`` may be a
    float or a per-sample tensor (MagFace)."""
    sin_y = torch.sqrt(1.0 - cos_y * cos_y)
    if isinstance(margin, torch.Tensor):
        cos_m, sin_m, threshold = torch.cos(margin), torch.sin(margin), torch.cos(math.pi - margin)
    else:  # Python floats: no device tensors made (and copied to the GPU) every step
        cos_m, sin_m, threshold = math.cos(margin), math.sin(margin), math.cos(math.pi - margin)
    cos_y_plus_m = cos_y * cos_m - sin_y * sin_m
    return torch.where(cos_y > threshold, cos_y_plus_m, cos_y - margin * sin_m)


def easy_margin(cos_y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ``easy_margin`` rule of insightface's ArcFace, MagFace's and MV-Softmax's training
    code: the margin-modulated ``target`` where ``cos_y > 0``, ``cos_y`` (no margin) elsewhere."""
    return torch.where(cos_y > 0, target, cos_y)


def clamp_cosine(cos: torch.Tensor) -> torch.Tensor:
    """Keep cosines inside (-1, 1) so that acos and sqrt(1 - cos^2) have finite gradients."""
    return cos.clamp(-1 + COS_EPS, 1 - COS_EPS)


def put_target(logits: torch.Tensor, index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits`` with column ``index`` of each row replaced by ``target``; rows whose target
    center this store does not hold (``index == -1``, Partial-FC) keep their logits."""
    held = index >= 0
    column = index.clamp_min(0)
    return logits.scatter(1, column, torch.where(held, target, logits.gather(1, column)))


@dataclass
class CenterCosines:
    """What a class-center store gives a margin, for the ``rows`` of the batch it scores.

    ``cos`` (rows, centers held) float32 cosines ``<x/|x|, W_j/|W_j|>`` (for the softmax
    family, whose ``normalized_centers`` is false, the plain products ``W_j·f(x) + b_j``; under
    the fused epilogue detached, and None where no statistics were asked for);
    ``cos_y`` (rows, 1) the clamped target cosine of every row, also where another rank holds
    the target center; ``index`` (rows, 1) the target's column in ``cos`` or -1 where it is not
    held here; ``norms`` (rows, 1) embedding norms; ``center_norms`` (centers held,) ``|W_j|``;
    ``local_norms`` the norms of this rank's own embeddings (for terms averaged per rank).
    """

    cos: torch.Tensor | None
    cos_y: torch.Tensor
    index: torch.Tensor
    norms: torch.Tensor
    center_norms: torch.Tensor
    local_norms: torch.Tensor


class Margin(nn.Module):
    """A cosine margin: ``scale * T(cos_y)`` for the target, ``scale * N(cos_j)`` elsewhere.

    Class attributes tell a store what the margin needs: ``stores`` (the class-center stores
    it runs on), ``normalized_centers`` (cosines, not plain products), ``class_bias`` (a
    per-class bias in the store) and ``centers_per_class`` (Sub-center ArcFace's K).
    """

    stores: tuple[str, ...] = ("full", "partial_fc")
    normalized_centers = True
    class_bias = False
    centers_per_class = 1
    # False where the logit scale depends on the class (L-Softmax's |W_j|·|x|) or an extra
    # term needs the (N, C) cosines with their gradient (NormFace's agent losses).
    fused = True

    def __init__(self, scale: float = 64.0):
        super().__init__()
        self.scale = scale
        self._extra_loss: torch.Tensor | None = None

    def bind(self, num_classes: int) -> None:
        """Called once by the store with the number of classes (for checks that need it)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the store multiplies with the class centers: the unit embedding here."""
        return F.normalize(x, dim=1)

    def logit_scale(self, norms: torch.Tensor, center_norms: torch.Tensor):
        """Multiplier of the modulated cosines: a constant s here, |x| or |x||W_j| elsewhere."""
        return self.scale

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """T(cos_y) (N, 1) before scaling, given the embedding norms (N, 1)."""
        return cos_y

    def non_target_logit(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """N(cos_j) (N, C) before scaling, given the hard-negative bound (N, 1), the modulated
        target T(cos_y) unless ``hard_negative_bound`` says otherwise: ``cos_j``, or
        ``hard_negative_logit(cos_j)`` where ``cos_j`` exceeds it. A margin that overrides this
        runs the reference path only (``fused_epilogue``)."""
        hard = self.hard_negative_logit(cos)
        return cos if hard is None else torch.where(cos > target, hard, cos)

    def hard_negative_logit(self, cos: torch.Tensor) -> torch.Tensor | None:
        """h(cos_j) for the hard negatives ``cos_j > T(cos_y)`` (MV-Softmax, CurricularFace), or
        None: every non-target logit stays ``cos_j``. Elementwise; a margin that defines it also
        defines ``hard_negative_slope``."""
        return None

    def hard_negative_bound(self, cos_y: torch.Tensor, norms: torch.Tensor,
                            target: torch.Tensor) -> torch.Tensor:
        """What a non-target cosine must exceed to be a hard negative (rows, 1): the modulated
        target T(cos_y) itself here."""
        return target

    def hard_negative_slope(self, cos: torch.Tensor) -> torch.Tensor:
        """h'(cos_j), the derivative of ``hard_negative_logit`` (the fused backward's slope)."""
        raise NotImplementedError(f"{type(self).__name__} defines hard_negative_logit but not "
                                  "its derivative hard_negative_slope")

    @property
    def fused_epilogue(self) -> bool:
        """Whether a store may compute this margin's loss with the fused epilogue: cosines to
        normalised centers, no class bias, ``N`` the identity or a hard-negative rule, a logit
        scale of one value or one per row (``fused``), and neither ``logits`` nor
        ``non_target_logit`` overridden (such a margin runs its own formula, unfused)."""
        cls = type(self)
        return (self.fused and self.normalized_centers and not self.class_bias
                and cls.logits is Margin.logits
                and cls.non_target_logit is Margin.non_target_logit)

    def update_state(self, cos_y: torch.Tensor, norms: torch.Tensor, reduce: Reduce) -> None:
        """Advance the margin's state from a training batch (detached inputs; ``reduce`` sums a
        tensor over the global batch's ranks, so statistics are global under DDP); none here."""

    def set_step(self, step: int) -> None:
        """Told the number of optimizer steps taken before each training batch; unused here."""

    def extra_term(self, c: CenterCosines) -> torch.Tensor | None:
        """The extra loss term of a training batch (MagFace's regulariser), or None. Under the
        fused epilogue ``c.cos`` is None: a term that needs the cosines sets ``fused = False``."""
        return None

    def advance(self, c: CenterCosines, reduce: Reduce) -> None:
        """A training forward, before the logits: the state advances on the batch's (global)
        statistics and the batch's extra term is kept for ``extra_loss``."""
        self.update_state(c.cos_y.detach(), c.norms.detach(), reduce)
        self._extra_loss = self.extra_term(c)

    def logits(self, c: CenterCosines) -> torch.Tensor:
        """Logits (rows, centers held) on which cross-entropy is the loss, in float32."""
        target = self.target_logit(c.cos_y, c.norms)
        bound = self.hard_negative_bound(c.cos_y, c.norms, target)
        logits = put_target(self.non_target_logit(c.cos, bound), c.index, target)
        return logits * self.logit_scale(c.norms, c.center_norms)

    def unmargined(self, c: CenterCosines) -> torch.Tensor:
        """Scores without margin whose argmax is the predicted class (per row)."""
        return c.cos

    def extra_loss(self) -> torch.Tensor | None:
        """The extra loss term of the last training forward, if the margin has one (once)."""
        extra, self._extra_loss = self._extra_loss, None
        return extra

    def state_metrics(self) -> dict[str, torch.Tensor]:
        """Scalar state worth watching (lambda, t, learnt scale, norm statistics), as detached
        tensors: logging them costs no device-to-host copy in the training step."""
        return {}
