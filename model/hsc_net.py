"""The HSC network: ResNet-38d + CAM head + SEAM's PCM branch + the two projectors.

Module names equal the official ``network/resnet38_eps_seam_hsc.py::Net`` state-dict keys (242 keys
at width 1.0, K = 20), so the released ``HSC_eps_v2.pth`` loads strictly.
See ../shared/docs/algorithm.md section 2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HSCNetConfig
from .resnet38d import ResNet38d

# Heads trained from scratch (lr x10 / x20). ``extra_F`` is deliberately absent: the official code
# tests membership on the Conv2d modules and ``extra_F`` is a Sequential, so its two convs land in
# the x1 / x2 groups (algorithm.md 2.4).
FROM_SCRATCH_HEADS = ("fc8", "f8_3", "f8_4", "f9", "proj_fc")


class HSCOutput(NamedTuple):
    """Training forward of :class:`HSCNet` (unpacks like the official 6-tuple).

    pred:    (N, K+1)     spatial mean of ``cam``
    cam:     (N, K+1, h, w) raw ``fc8`` logits, background last
    pred_rv: (N, K+1)     spatial mean of ``cam_rv`` (no loss uses it)
    cam_rv:  (N, K+1, h, w) PCM-refined CAM (gradient reaches only f8_3, f8_4, f9)
    f_pixel: (N, pixel_dim, h, w) ``relu(proj_fc(conv6))`` pixel embeddings (paper's u_2)
    f_roi:   (N, roi_dim, h, w) ``extra_F(conv6)`` ROI/class embeddings (paper's u_1)
    """

    pred: Tensor
    cam: Tensor
    pred_rv: Tensor
    cam_rv: Tensor
    f_pixel: Tensor
    f_roi: Tensor


def pcm_seed(cam: Tensor) -> Tensor:
    """SEAM's PCM input from CAM logits ``(N, K+1, h, w)`` (background last), without gradient.

    Max-normalise ``relu(cam)`` per channel, replace the background channel by ``1 - max_fg``, and
    keep in each pixel only the maximal foreground class (ties keep every tied channel).
    """
    with torch.no_grad():
        n, c, _, _ = cam.shape
        k = c - 1
        pos = F.relu(cam)
        peak = pos.amax(dim=(2, 3), keepdim=True) + 1e-5
        z = F.relu(pos - 1e-5) / peak
        fg = z[:, :k]
        fg_max = fg.amax(dim=1, keepdim=True)
        fg = torch.where(fg < fg_max, torch.zeros_like(fg), fg)
        return torch.cat([fg, 1.0 - fg_max], dim=1)


class HSCNet(ResNet38d):
    """ResNet-38d with the HSC heads (``fc8``, PCM ``f8_3``/``f8_4``/``f9``, ``proj_fc``, ``extra_F``)."""

    def __init__(self, cfg: HSCNetConfig | None = None) -> None:
        cfg = cfg or HSCNetConfig()
        super().__init__(width=cfg.width, dropout=cfg.dropout, freeze_bn=cfg.freeze_bn)
        self.cfg = cfg
        ch = self.feature_channels
        self.fc8 = nn.Conv2d(ch["conv6"], cfg.num_classes + 1, 1, bias=False)
        self.f8_3 = nn.Conv2d(ch["conv4"], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(ch["conv5"], 128, 1, bias=False)
        self.f9 = nn.Conv2d(3 + 64 + 128, 192, 1, bias=False)
        self.proj_fc = nn.Conv2d(ch["conv6"], cfg.pixel_dim, 1, bias=False)
        self.extra_F = nn.Sequential(
            nn.Conv2d(ch["conv6"], cfg.roi_dim, 3, padding=1, bias=True),
            nn.BatchNorm2d(cfg.roi_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(cfg.roi_dim, cfg.roi_dim, 1, bias=True),
        )
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        nn.init.xavier_uniform_(self.proj_fc.weight)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def pcm(self, seed: Tensor, feats: Tensor) -> Tensor:
        """PCM: ``cam_rv = seed @ A`` with the column-normalised affinity of ``f9(feats)``.

        seed: (N, K+1, h, w) from :func:`pcm_seed`; feats: (N, 195, h, w).
        """
        n, c, h, w = seed.shape
        g = self.f9(feats).flatten(2)  # (N, 192, hw)
        g = g / (torch.norm(g, dim=1, keepdim=True) + 1e-5)
        aff = F.relu(torch.bmm(g.transpose(1, 2), g))  # (N, hw, hw)
        aff = aff / (aff.sum(dim=1, keepdim=True) + 1e-5)  # every column sums to ~1
        return torch.bmm(seed.flatten(2), aff).view(n, c, h, w)

    def forward_pcm_inputs(self, img: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Backbone features, CAM logits and the PCM inputs ``(seed, feats)`` (for tests and tools)."""
        d = self.forward_as_dict(img)
        cam = self.fc8(d["conv6"])
        h, w = cam.shape[2:]
        f8_3 = F.relu(self.f8_3(d["conv4"].detach()))
        f8_4 = F.relu(self.f8_4(d["conv5"].detach()))
        img_s = F.interpolate(img, (h, w), mode="bilinear", align_corners=True)
        feats = torch.cat([img_s, f8_3, f8_4], dim=1)
        d["cam"] = cam
        return d, pcm_seed(cam.detach()), feats

    def forward(self, img: Tensor) -> HSCOutput:  # type: ignore[override]
        """Training forward. img: (N, 3, H, W) normalised RGB."""
        d, seed, feats = self.forward_pcm_inputs(img)
        x = d["conv6"]
        cam = d["cam"]
        cam_rv = self.pcm(seed, feats)
        f_pixel = F.relu(self.proj_fc(x))
        f_roi = self.extra_F(x)
        return HSCOutput(cam.mean(dim=(2, 3)), cam, cam_rv.mean(dim=(2, 3)), cam_rv, f_pixel, f_roi)

    def forward_cam(self, img: Tensor) -> Tensor:
        """Inference CAM: raw ``fc8`` logits (N, K+1, h, w), no PCM (algorithm.md 2.3)."""
        return self.fc8(super().forward(img))

    def parameter_groups(self, *, include_frozen: bool = False) -> list[list[nn.Parameter]]:
        """The four official optimiser groups (algorithm.md 2.4), convolution parameters only.

        0: weights of backbone convs and of ``extra_F`` (lr x1, weight decay),
        1: their biases (lr x2, no decay), 2: weights of ``fc8, f8_3, f8_4, f9, proj_fc`` (lr x10,
        decay), 3: their biases (lr x20, no decay; empty). BatchNorm parameters are in no group.
        ``include_frozen=True`` reproduces the official script, which builds the groups before
        ``train()`` and so also lists the 8 never-trained conv weights of conv1a/b2* in group 0.
        """
        scratch = {id(getattr(self, n)) for n in FROM_SCRATCH_HEADS}
        frozen = {id(p) for p in self.frozen_parameters()}
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for m in self.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            base = 2 if id(m) in scratch else 0
            for offset, p in enumerate((m.weight, m.bias)):
                if not isinstance(p, nn.Parameter) or (id(p) in frozen and not include_frozen):
                    continue
                groups[base + offset].append(p)
        return groups


def build_hsc_net(num_classes: int = 20, width: float = 1.0, **kw: object) -> HSCNet:
    """Build an HSC network (``width=0.125`` for tests and CPU demos)."""
    return HSCNet(HSCNetConfig(num_classes=num_classes, width=width, **kw))  # type: ignore[arg-type]
