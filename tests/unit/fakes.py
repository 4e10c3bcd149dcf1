"""Small stand-ins for the unit tests: a fast model, bounded waits inside an event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import InputError, Model, TensorSpec


class FakeModel(Model):
    """y = 2x on float32 ``x`` of shape [n, d]; ``forward`` can be held to keep the device busy.

    ``parameters={"fail": "input"}`` makes ``prepare`` raise InputError, ``{"fail": "bug"}`` a
    RuntimeError; ``{"explode": True}`` makes ``forward`` raise.
    """

    model_type = "fake"
    inputs = (TensorSpec("x", "FP32", (-1, -1)),)
    outputs = (TensorSpec("y", "FP32", (-1, -1)),)

    def __init__(self) -> None:
        super().__init__(Path("."), {}, torch.device("cpu"))
        self.forwards: list[tuple[int, ...]] = []  # the shape of each forward's batch, in order
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a forward starts

    @classmethod
    def build(cls, folder: Path, config: dict[str, Any], device: torch.device) -> FakeModel:
        return cls()

    def hold(self) -> None:
        """Forwards from now on wait until ``release``: the device looks busy."""
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    def prepare(self, inputs: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        fail = parameters.get("fail")
        if fail == "input":
            raise InputError("x is not to my liking")
        if fail == "bug":
            raise RuntimeError("a bug in prepare")
        self.check_inputs(inputs)
        return {"x": torch.from_numpy(np.array(inputs["x"]))}

    def forward(self, batch: Mapping[str, torch.Tensor], parameters: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.forwards.append(tuple(batch["x"].shape))
        self.entered.set()
        if not self.gate.wait(10):
            raise RuntimeError("FakeModel held for 10s: a test forgot to release it")
        if parameters.get("explode"):
            raise RuntimeError("forward exploded")
        return {"y": batch["x"] * 2}


def x(n: int = 1, d: int = 4, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * d, dtype=np.float32) + start).reshape(n, d)


async def until(predicate: Callable[[], object], timeout: float = 2.0, what: str = "condition") -> None:
    """Let the loop run until ``predicate()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.001)


def run(main: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run ``main()`` in a fresh event loop, bounded so that a hang fails the test instead of CI."""
    return asyncio.run(asyncio.wait_for(main(), timeout))
