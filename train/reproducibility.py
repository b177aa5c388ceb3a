"""Same seed, same machine, same numbers: what makes a run (``astrea demo``, ``astrea pretrain-llm``)
repeat bit for bit.

Seeds alone are not enough. Floating-point sums come out differently when they are split over a
different number of threads, so the thread count is fixed rather than taken from the machine;
and transformers' :func:`~transformers.enable_full_determinism` seeds Python, NumPy and torch and
switches torch to deterministic kernels (on a GPU: cuBLAS / cuDNN too).
"""

from __future__ import annotations

import contextlib

import torch

#: Intra-op threads of the demo: the 2-core machine its README numbers come from.
DEFAULT_THREADS = 2


@contextlib.contextmanager
def reproducible(seed: int, threads: int | None = DEFAULT_THREADS):
    """Within the block: ``threads`` torch threads (``None``: torch's own choice), every generator
    seeded with ``seed`` and deterministic algorithms; the thread count and the deterministic
    flags are restored afterwards (a test or notebook keeps its own). The recipes load data in the
    main process (``dataloader_num_workers: 0``), so there are no worker processes to seed."""
    from transformers import enable_full_determinism

    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: use at least 1 (or None for torch's default)")
    cudnn = torch.backends.cudnn
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic, cudnn.benchmark)
    if threads is not None:
        torch.set_num_threads(threads)
    enable_full_determinism(seed)
    # An op with no deterministic kernel (a few CUDA backward passes) warns rather than stopping a
    # demo on a GPU; on the CPU every op the demo runs has one.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])
        cudnn.deterministic, cudnn.benchmark = previous[3], previous[4]


__all__ = ["DEFAULT_THREADS", "reproducible"]
