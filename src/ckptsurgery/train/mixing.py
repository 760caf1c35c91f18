"""Label smoothing, mixup and cutmix, and the losses that go with them: timm's semantics
(``timm.data.Mixup`` in its default ``batch`` mode, ``timm.loss.SoftTargetCrossEntropy``,
``timm.loss.LabelSmoothingCrossEntropy``), written here so that the trainer does not need timm;
the tests check them against timm's own when it is installed.

- Label smoothing ``s`` over ``C`` classes: the target is ``1 - s + s/C`` on the true class
  and ``s/C`` elsewhere; the loss is ``(1 - s) * nll + s * mean_c(-log p_c)``, which is what
  ``F.cross_entropy(label_smoothing=s)`` computes.
- Mixup / cutmix: with probability ``mix_prob`` a batch is mixed with itself reversed
  (``x.flip(0)``), with ``lam ~ Beta(alpha, alpha)``; with both on, cutmix is chosen with
  probability ``switch_prob``. Mixup blends whole images (``lam * x + (1 - lam) * x_flipped``);
  cutmix pastes a box of area ``~(1 - lam)`` from the flipped batch, and ``lam`` is corrected
  to the box's actual area. The targets are ``lam * onehot(y) + (1 - lam) * onehot(y_flipped)``
  (smoothed as above) and the loss is the soft-target cross-entropy
  ``mean_i sum_c -t_ic log p_ic``.

The draws come from a ``numpy.random.RandomState`` in the order timm makes them with the global
``numpy.random``, so that the same seed mixes the same way as timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Mixup", "smooth_one_hot", "soft_target_cross_entropy"]


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot float targets, ``1 - s + s/C`` on the class and ``s/C`` elsewhere."""
    import torch

    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((target.size(0), num_classes), off, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), on)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_c -target_ic * log_softmax(logits)_ic`` (timm's SoftTargetCrossEntropy)."""
    import torch.nn.functional as F

    return (-target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class Mixup:
    """timm's ``Mixup`` (batch mode): ``mixup(x, y)`` mixes ``x`` in place and returns the
    soft targets. See the module docstring."""

    def __init__(
        self,
        *,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        correct_lam: bool = True,
        rng: np.random.RandomState | None = None,
    ) -> None:
        import numpy as np

        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.correct_lam = correct_lam
        # The global RandomState, as timm draws from, unless one is given.
        self.rng: np.random.RandomState = rng if rng is not None else np.random.mtrand._rand
        self.last_lam = 1.0  # the last batch's lam (after the cutmix correction)

    def _params(self) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch; ``lam = 1``: not mixed."""
        lam, use_cutmix = 1.0, False
        if self.rng.rand() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(self.rng.rand() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam = float(self.rng.beta(alpha, alpha))
            elif self.mixup_alpha > 0:
                lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
            elif self.cutmix_alpha > 0:
                use_cutmix = True
                lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        return lam, use_cutmix

    def _box(self, height: int, width: int, lam: float) -> tuple[int, int, int, int, float]:
        """A box of area ``~(1 - lam)`` centred at a random pixel, clipped to the image; and
        ``lam`` corrected to the clipped area (timm's ``rand_bbox`` and correction)."""
        import numpy as np

        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy = self.rng.randint(0, height, size=None)
        cx = self.rng.randint(0, width, size=None)
        yl = int(np.clip(cy - cut_h // 2, 0, height))
        yh = int(np.clip(cy + (cut_h + 1) // 2, 0, height))
        xl = int(np.clip(cx - cut_w // 2, 0, width))
        xh = int(np.clip(cx + (cut_w + 1) // 2, 0, width))
        if self.correct_lam:
            lam = 1.0 - (yh - yl) * (xh - xl) / float(height * width)
        return yl, yh, xl, xh, lam

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lam, use_cutmix = self._params()
        if lam != 1.0:
            if use_cutmix:
                yl, yh, xl, xh, lam = self._box(x.shape[-2], x.shape[-1], lam)
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            else:
                flipped = x.flip(0).mul_(1.0 - lam)
                x.mul_(lam).add_(flipped)
        self.last_lam = lam
        y1 = smooth_one_hot(target, self.num_classes, self.label_smoothing)
        y2 = smooth_one_hot(target.flip(0), self.num_classes, self.label_smoothing)
        return y1 * lam + y2 * (1.0 - lam)
