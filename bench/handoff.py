"""The event loop's CPU per hand-off to an inference thread: ThreadPoolExecutor against batcher.Device.

    .venv/bin/python bench/handoff.py [--calls 2000] [--rounds 3] [--job-ms 0.5] [--core 1]

Each call hands a job that sleeps ``--job-ms`` (the GIL released, as torch does while it
computes) to the thread and awaits its result, one at a time, on uvloop; the loop thread's CPU
time (``time.thread_time``) per call is what the hand-off costs the loop, the wall time per call
minus the job is its latency. ``--core`` pins the process to one core, as a worker is; ``-1``
leaves it unpinned. Alternating rounds, each figure printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from server.serving.batcher import Device  # noqa: E402


async def measure(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    pool, device = ThreadPoolExecutor(max_workers=1), Device()
    seconds = args.job_ms / 1000

    def job() -> None:
        time.sleep(seconds)

    ways = {"ThreadPoolExecutor": lambda: loop.run_in_executor(pool, job), "batcher.Device": lambda: device.run(job)}
    for rnd in range(args.rounds):
        for name, call in ways.items():
            cpu, wall = time.thread_time(), time.perf_counter()
            for _ in range(args.calls):
                await call()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            print(f"round {rnd + 1}: {name}: loop CPU {cpu / args.calls * 1e6:.1f} us per hand-off, "
                  f"latency {(wall / args.calls - seconds) * 1e6:.0f} us above the job", flush=True)
    pool.shutdown()
    device.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--job-ms", type=float, default=0.5)
    ap.add_argument("--core", type=int, default=1)
    args = ap.parse_args()
    if args.core >= 0:
        os.sched_setaffinity(0, {args.core})
    uvloop.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
