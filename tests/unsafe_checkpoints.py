"""Checkpoint files whose loading runs code: each creates a marker file when loaded unsafely.

Shared by the tests of clip_jax.torchscript and of the convert CLI. Importing this module runs
nothing harmful; only `torch.jit.load` / plain unpickling of the files it builds does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch


class EvilModule(torch.nn.Module):
    """Its scripted __setstate__ creates the file named in its pickled state."""

    def __init__(self, marker: str):
        super().__init__()
        self.register_buffer("buf", torch.ones(2))
        self.marker = marker

    def forward(self, x):
        return x * self.buf

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool, str]:
        return (self.buf, self.training, self.marker)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool, str]) -> None:
        self.training = state[1]
        self.marker = state[2]
        # shared=True opens the file with O_CREAT: loading creates it. The result is used so
        # that TorchScript's dead-code elimination keeps the call.
        self.buf = state[0] + torch.from_file(state[2], True, 2, dtype=torch.float32)


@torch.jit.script
class EvilObject:
    """A TorchScript class (not a module) with the same kind of __setstate__."""

    def __init__(self, marker: str):
        self.marker = marker
        self.scale = 1

    def __getstate__(self) -> Tuple[str, int]:
        return (self.marker, self.scale)

    def __setstate__(self, state: Tuple[str, int]) -> None:
        self.marker = state[0]
        self.scale = state[1] + int(torch.from_file(state[0], True, 1, dtype=torch.float32).item())


class HoldsEvilObject(torch.nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.hook = EvilObject(marker)

    def forward(self, x):
        return self.lin(x) * self.hook.scale


def save_scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


class Opener:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling calls open(path, "w"): creates the file
