"""Worker processes for CPU-bound grids: one torch thread each, so that 2 workers keep 2 cores busy
without spin-waiting each other (several multi-threaded torch processes on 2 cores crawl)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes with one torch thread each.

    Spawn, not fork: a forked child of a process that already ran OpenMP threads can hang."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(1,))
