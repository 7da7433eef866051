"""Run a test body in several CPU processes joined by the gloo backend.

Each worker sets TRITON_INTERPRET before importing anything that defines kernels, joins
the process group on a free local port, runs `body(rank, world_size, *args)` and reports
an exception back to the parent, which fails the test with the worker's traceback.
"""

from __future__ import annotations

import gc
import os
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, body, args, errors):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N workers share 2 cores in CI
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        body(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
    finally:
        # The Triton interpreter leaves reference cycles holding tensor storages; freed by the
        # collector at interpreter exit, after the process group is gone, they abort the process
        # now and then ("terminate called without an active exception"). Free them first.
        gc.collect()
        dist.destroy_process_group()


def run_distributed(body, world_size: int, *args, timeout: float = 600.0) -> None:
    """Run `body(rank, world_size, *args)` in `world_size` gloo processes; re-raise the first failure.
    `body` must be a module-level function (it is pickled for spawned processes)."""
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    port = _free_port()
    workers = [
        context.Process(target=_worker, args=(rank, world_size, port, body, args, errors))
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    # One deadline for all; a rank that failed leaves its peers waiting in a collective,
    # so the others get a short grace period, not the whole timeout.
    deadline = time.monotonic() + timeout
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        if not errors.empty() or any(w.exitcode not in (None, 0) for w in workers):
            deadline = min(deadline, time.monotonic() + 10.0)
        time.sleep(0.05)
    stuck = [w for w in workers if w.is_alive()]
    for worker in stuck:
        worker.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        rank, trace = min(failures)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{trace}")
    if stuck:
        raise AssertionError(f"{len(stuck)} of {world_size} workers did not finish in {timeout:.0f} s")
    bad = [w.exitcode for w in workers if w.exitcode != 0]
    if bad:
        raise AssertionError(f"workers exited with codes {bad}")
