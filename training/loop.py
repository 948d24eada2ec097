"""What step 1 (``hsc train``) and step 2 (``hsc train-seg``) runs share: the step loop with its metrics,
progress bar, periodic checkpoints and Ctrl-C handling, and the files that make ``--resume`` exact.

A run folder holds ``config.json``, ``metrics.jsonl``, ``step_<n>.safetensors`` (the last ``keep``),
``state.pt`` (step, checkpoint name, optimiser state) and ``rng.rank<r>.pt`` (each process's RNG
states, so that a resumed run draws the same dropout masks as an uninterrupted one).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("hsc.train")

STATE_FILE = "state.pt"
FINAL = "final.safetensors"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary name and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_file(out: Path, rank: int) -> Path:
    return out / f"rng.rank{rank}.pt"


def save_rng_state(out: Path, rank: int) -> None:
    """This process's CPU and CUDA RNG states (dropout masks, random second views)."""
    rng = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    atomic_torch_save(rng, rng_file(out, rank))


def restore_rng_state(out: Path, rank: int) -> None:
    path = rng_file(out, rank)
    if not path.is_file():
        return
    rng = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch_rng"])
    if torch.cuda.is_available() and rng["cuda_rng"]:
        torch.cuda.set_rng_state_all(rng["cuda_rng"])


def save_state(out: Path, *, step: int, checkpoint: Path, optimizer: torch.optim.Optimizer) -> None:
    """``state.pt``: the step, the checkpoint it belongs to and the optimiser state."""
    atomic_torch_save(
        {"step": step, "checkpoint": checkpoint.name, "optimizer": optimizer.state_dict()}, out / STATE_FILE
    )


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist (nothing to resume in {out})")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints ``step_<n>.safetensors``."""
    kept = sorted(out.glob("step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    for p in kept[: max(0, len(kept) - keep)]:
        p.unlink(missing_ok=True)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc)


def run_steps(
    batches: Iterable[Any],
    *,
    step_fn: Callable[[Any], dict[str, float]],
    current_step: Callable[[], int],
    save: Callable[[Path], None],
    out: Path,
    iters: int,
    images_per_step: int,
    log_every: int,
    save_every: int,
    main_process: bool = True,
    progress: bool = True,
    desc: str = "hsc train",
    postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
    stop_after: int | None = None,
) -> Path | None:
    """Train until ``iters`` steps are done; returns None then, or the checkpoint written when the run
    stopped early (Ctrl-C, or ``stop_after`` steps in this call).

    ``step_fn(batch)`` runs one optimiser step and returns its logged values; ``save(path)`` writes a
    checkpoint with the resume state. Every ``log_every`` steps a line goes to ``out/metrics.jsonl``
    (the values, ``images_per_s``, ``step``); every ``save_every`` steps a checkpoint is written.
    """
    metrics = (out / "metrics.jsonl").open("a") if main_process else open(os.devnull, "w")
    interrupted = {"flag": False}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted["flag"] = True

    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread() else None
    bar = progress_bar(iters, current_step(), progress and main_process, desc)
    t_last, n_last, steps_here = time.perf_counter(), 0, 0
    try:
        for batch in batches:
            if current_step() >= iters:
                break
            values = step_fn(batch)
            step = current_step()
            steps_here += 1
            n_last += images_per_step
            if step % log_every == 0 or step == iters:
                now = time.perf_counter()
                values["images_per_s"] = n_last / max(now - t_last, 1e-9)
                values["step"] = step
                metrics.write(json.dumps(values) + "\n")
                metrics.flush()
                t_last, n_last = now, 0
            if bar is not None:
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(postfix(values))
            stop = interrupted["flag"] or (stop_after is not None and steps_here >= stop_after)
            if step % save_every == 0 or stop:
                save(out / f"step_{step}.safetensors")
            if stop:
                if interrupted["flag"]:
                    log.warning("interrupted: checkpoint written at step %d; continue with --resume", step)
                return out / f"step_{step}.safetensors"
            if step >= iters:
                break
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return None
