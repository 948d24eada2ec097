"""MomentumBanks: buffer names and shapes, official-order initialisation, persistence, DDP broadcast."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsc.model.prototypes import BANK_NAMES, OFFICIAL_BANK_NAMES, MomentumBanks


def test_buffers_names_and_shapes():
    banks = MomentumBanks(20)
    assert [name for name, _ in banks.named_buffers()] == list(BANK_NAMES)
    assert BANK_NAMES == ("class_v1", "roi_v1", "pixel_v1", "class_v2", "roi_v2", "pixel_v2")
    shapes = {name: tuple(t.shape) for name, t in banks.named_buffers()}
    assert shapes == {
        "class_v1": (21, 256),
        "roi_v1": (2, 256),
        "pixel_v1": (21, 128),
        "class_v2": (21, 256),
        "roi_v2": (2, 256),
        "pixel_v2": (21, 128),
    }
    assert list(banks.parameters()) == []
    small = MomentumBanks(3, roi_dim=16, pixel_dim=8)
    assert small.class_v2.shape == (4, 16) and small.pixel_v1.shape == (4, 8)
    with pytest.raises(ValueError):
        MomentumBanks(0)


def test_official_mapping_and_init_order():
    assert list(OFFICIAL_BANK_NAMES) == [
        "memobank1",
        "memobank_fb",
        "memobank1_p",
        "memobank2",
        "memobank1_fb",
        "memobank2_p",
    ]
    k, dr, dp = 5, 12, 6
    banks = MomentumBanks(k, roi_dim=dr, pixel_dim=dp, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    draws = [
        torch.randn(s, generator=g)
        for s in ((k + 1, dr), (2, dr), (k + 1, dp), (k + 1, dr), (2, dr), (k + 1, dp))
    ]
    for (official, ours), want in zip(OFFICIAL_BANK_NAMES.items(), draws, strict=True):
        assert torch.equal(getattr(banks, ours), want), official
        assert torch.equal(banks.official_state()[official], want)
    # the global RNG path is the same order
    torch.manual_seed(11)
    a = MomentumBanks(k, roi_dim=dr, pixel_dim=dp)
    torch.manual_seed(11)
    assert torch.equal(a.class_v1, torch.randn(k + 1, dr)) and torch.equal(a.roi_v1, torch.randn(2, dr))


def test_load_official_and_assign():
    banks = MomentumBanks(2, roi_dim=4, pixel_dim=3)
    new = {
        name: torch.full(tuple(getattr(banks, ours).shape), float(i))
        for i, (name, ours) in enumerate(OFFICIAL_BANK_NAMES.items())
    }
    banks.load_official(new)
    for i, ours in enumerate(BANK_NAMES):
        assert torch.all(getattr(banks, ours) == i)
    src = torch.ones(3, 4, requires_grad=True)
    banks.assign_(class_v2=src * 2)
    assert torch.all(banks.class_v2 == 2) and not banks.class_v2.requires_grad
    with pytest.raises(KeyError):
        banks.load_official({"memobank3": torch.zeros(3, 4)})
    with pytest.raises(KeyError):
        banks.assign_(class_v3=torch.zeros(3, 4))
    with pytest.raises(ValueError):
        banks.assign_(roi_v1=torch.zeros(3, 4))


def test_state_dict_round_trip():
    banks = MomentumBanks(4, roi_dim=8, pixel_dim=4, generator=torch.Generator().manual_seed(1))
    sd = banks.state_dict()
    assert list(sd) == list(BANK_NAMES)
    other = MomentumBanks(4, roi_dim=8, pixel_dim=4, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other.class_v1, banks.class_v1)
    other.load_state_dict(sd)
    for name in BANK_NAMES:
        assert torch.equal(getattr(other, name), getattr(banks, name))
    # nested in a model, through torch.save / torch.load
    model = torch.nn.Module()
    model.banks = banks
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert set(loaded) == {f"banks.{n}" for n in BANK_NAMES}
    assert torch.equal(loaded["banks.pixel_v2"], banks.pixel_v2)


def test_buffers_follow_dtype_and_device_moves():
    banks = MomentumBanks(2, roi_dim=4, pixel_dim=3).double()
    assert all(t.dtype == torch.float64 for t in banks.buffers())


def test_broadcast_without_process_group_is_a_noop():
    banks = MomentumBanks(2, roi_dim=4, pixel_dim=3)
    before = {k: v.clone() for k, v in banks.banks().items()}
    assert not dist.is_initialized()
    banks.broadcast_()
    assert all(torch.equal(getattr(banks, k), v) for k, v in before.items())


def _worker(rank: int, world: int, path: str, queue) -> None:  # pragma: no cover - runs in a child
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = dist.FileStore(path, world)
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store)
    try:
        banks = MomentumBanks(2, roi_dim=4, pixel_dim=3, generator=torch.Generator().manual_seed(100 + rank))
        banks.broadcast_(src=0)
        # numpy, not tensors: torch pickles a tensor as a file descriptor served by this process,
        # which is gone if it exits before the parent reads the queue (EOFError seen in CI)
        queue.put((rank, {k: v.numpy().copy() for k, v in banks.banks().items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_makes_ranks_identical(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "store"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = MomentumBanks(2, roi_dim=4, pixel_dim=3, generator=torch.Generator().manual_seed(100))
    for name in BANK_NAMES:
        assert torch.equal(torch.from_numpy(results[0][name]), getattr(want, name))
        assert torch.equal(torch.from_numpy(results[1][name]), getattr(want, name))
