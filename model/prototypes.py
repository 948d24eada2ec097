"""The six momentum banks of HSC (docs/algorithm.md section 3.9), kept as named buffers.

The official code holds them as module-level globals created with ``torch.randn`` at import and never
saves them. Here they are buffers of :class:`MomentumBanks`, so they travel with ``state_dict()`` /
checkpoints and are restored on resume. The losses in :mod:`hsc.model.losses.contrast` never touch them:
they return the new bank values, and the owner writes them back with :meth:`MomentumBanks.assign_`.

Buffer names and the official globals they stand for (``K`` foreground classes, background last):

============  ================  ====================  =================================
our buffer    official global   shape                 used by
============  ================  ====================  =================================
``class_v1``  ``memobank1``     ``(K+1, roi_dim)``    CSC class prototypes, view 1
``roi_v1``    ``memobank_fb``   ``(2, roi_dim)``      RSC, view 1 (row 0 bg, row 1 ROI)
``pixel_v1``  ``memobank1_p``   ``(K+1, pixel_dim)``  PSC momentum prototypes, view 1
``class_v2``  ``memobank2``     ``(K+1, roi_dim)``    CSC class prototypes, view 2
``roi_v2``    ``memobank1_fb``  ``(2, roi_dim)``      RSC, view 2 (row 0 bg, row 1 ROI)
``pixel_v2``  ``memobank2_p``   ``(K+1, pixel_dim)``  PSC momentum prototypes, view 2
============  ================  ====================  =================================

The table's row order is the official creation order; :meth:`MomentumBanks.reset_` draws the six
``randn`` tensors in exactly that order from the given generator (not normalised, norm ~ sqrt(D)).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["BANK_NAMES", "OFFICIAL_BANK_NAMES", "MomentumBanks"]

#: official global name -> our buffer name, in the official creation (random draw) order.
OFFICIAL_BANK_NAMES: dict[str, str] = {
    "memobank1": "class_v1",
    "memobank_fb": "roi_v1",
    "memobank1_p": "pixel_v1",
    "memobank2": "class_v2",
    "memobank1_fb": "roi_v2",
    "memobank2_p": "pixel_v2",
}

#: our buffer names, in the official creation order.
BANK_NAMES: tuple[str, ...] = tuple(OFFICIAL_BANK_NAMES.values())


class MomentumBanks(nn.Module):
    """Class, ROI/background and pixel momentum banks of both views, as buffers.

    Args:
        num_classes: ``K``, the number of foreground classes (class and pixel banks have ``K + 1``
            rows, the background row last; the class-bank background row is never updated).
        roi_dim: size of the ROI/class embedding (``F_proj1``, official 256).
        pixel_dim: size of the pixel embedding (``F_proj2``, official 128).
        generator: optional CPU ``torch.Generator`` for the initial ``randn`` draws (else the global RNG).

    Buffers: ``class_v1``, ``roi_v1``, ``pixel_v1``, ``class_v2``, ``roi_v2``, ``pixel_v2`` (see the
    module docstring for the official names). Under DDP call :meth:`broadcast_` after every update so
    all ranks keep the same banks.
    """

    class_v1: Tensor
    roi_v1: Tensor
    pixel_v1: Tensor
    class_v2: Tensor
    roi_v2: Tensor
    pixel_v2: Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        roi_dim: int = 256,
        pixel_dim: int = 128,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if roi_dim < 1 or pixel_dim < 1:
            raise ValueError(f"roi_dim and pixel_dim must be >= 1, got {roi_dim}, {pixel_dim}")
        self.num_classes = num_classes
        self.roi_dim = roi_dim
        self.pixel_dim = pixel_dim
        for name, shape in self.shapes().items():
            self.register_buffer(name, torch.empty(shape))
        self.reset_(generator)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Buffer name -> shape, in the official creation order."""
        c = self.num_classes + 1
        per_view = {"class": (c, self.roi_dim), "roi": (2, self.roi_dim), "pixel": (c, self.pixel_dim)}
        return {name: per_view[name.split("_")[0]] for name in BANK_NAMES}

    @torch.no_grad()
    def reset_(self, generator: torch.Generator | None = None) -> None:
        """Redraw every bank from a standard normal, in the official order (memobank1 first)."""
        for name in BANK_NAMES:
            buf = getattr(self, name)
            draw = torch.randn(buf.shape, generator=generator, dtype=torch.float32)
            buf.copy_(draw)

    @torch.no_grad()
    def assign_(self, **banks: Tensor) -> None:
        """Overwrite banks by buffer name (e.g. ``assign_(class_v1=new)``), shapes must match.

        The values are copied without gradient into the existing buffers (device/dtype kept).
        """
        for name, value in banks.items():
            if name not in BANK_NAMES:
                raise KeyError(f"unknown bank {name!r}; expected one of {BANK_NAMES}")
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"bank {name}: shape {tuple(value.shape)} != {tuple(buf.shape)}")
            buf.copy_(value.detach())

    def load_official(self, banks: Mapping[str, Tensor]) -> None:
        """Set banks from tensors named as the official globals (``memobank1``, ``memobank_fb``, ...).

        Any subset may be given; unknown names raise ``KeyError``.
        """
        unknown = sorted(set(banks) - set(OFFICIAL_BANK_NAMES))
        if unknown:
            raise KeyError(f"unknown official bank names {unknown}; expected {list(OFFICIAL_BANK_NAMES)}")
        self.assign_(**{OFFICIAL_BANK_NAMES[k]: v for k, v in banks.items()})

    def official_state(self) -> dict[str, Tensor]:
        """The banks keyed by their official names (detached references to the buffers)."""
        return {off: getattr(self, ours).detach() for off, ours in OFFICIAL_BANK_NAMES.items()}

    def banks(self) -> dict[str, Tensor]:
        """The banks keyed by our buffer names (references, not copies)."""
        return {name: getattr(self, name) for name in BANK_NAMES}

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Make every rank's banks equal to those of rank ``src`` (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in BANK_NAMES:
            dist.broadcast(getattr(self, name), src=src)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, roi_dim={self.roi_dim}, pixel_dim={self.pixel_dim}"
