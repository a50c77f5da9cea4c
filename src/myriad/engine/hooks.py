"""Module hooks that gather chunks just before a module runs and release them after.

Forward: a pre-hook gathers the chunks of the module's own parameters; a post-hook releases each
chunk after its last forward use (uses per forward counted in the trace taken at ``apply``; the
count restarts whenever a released chunk is gathered again, so calling a submodule such as
``model.encode`` directly works too) and only when no running module (a parent sharing the chunk)
still needs it. Backward: the
post-hook puts a gradient hook on every output tensor; the first one to fire (just before the
module's backward runs) gathers the chunks again and opens their gradient buffers. Each
parameter's post-accumulate-grad hook hands its gradient to the store, which reduce-scatters a
chunk once all its parameters are done. Nothing in the model changes: only hooks are added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from myriad.engine.chunks import Chunk, ChunkStore


def output_tensors(out: Any) -> Iterator[torch.Tensor]:
    """Tensors inside a module's output: tensors, tuples/lists, dicts and dataclasses."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from output_tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from output_tensors(item)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            yield from output_tensors(getattr(out, f.name))


def trace_first_use(model: nn.Module, run_forward: Any) -> list[nn.Module]:
    """Modules with parameters of their own, in the order one forward calls them."""
    order: list[nn.Module] = []
    handles = []
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda m, _a: order.append(m)))
    try:  # the RNG is restored after, so tracing does not shift a stochastic model's draws
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return order


class Hooks:
    """The hooks of one model; ``remaining`` counts each chunk's forward uses still to come."""

    def __init__(self, store: ChunkStore, order: list[nn.Module]) -> None:
        self.store = store
        self.module_chunks: dict[nn.Module, list[Chunk]] = {}
        self.uses: dict[int, int] = {}
        for module in order:
            chunks = store.chunks_of(list(module.parameters(recurse=False)))
            self.module_chunks[module] = chunks
            for chunk in chunks:
                self.uses[chunk.index] = self.uses.get(chunk.index, 0) + 1
        self.remaining = dict(self.uses)
        self.in_use: dict[int, int] = {}  # chunk -> running modules that use it
        self.handles: list[Any] = []

    def install(self) -> None:
        for module in self.module_chunks:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))
        for param in self.store.index:
            self.handles.append(param.register_post_accumulate_grad_hook(self.store.add_grad))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, module: nn.Module, _args: Any) -> None:
        training = torch.is_grad_enabled()
        for chunk in self.module_chunks[module]:
            if self.store.gather(chunk, follow=training):  # its first use since released
                self.remaining[chunk.index] = self.uses[chunk.index]
            self.in_use[chunk.index] = self.in_use.get(chunk.index, 0) + 1

    def _post(self, module: nn.Module, _args: Any, out: Any) -> None:
        chunks = self.module_chunks[module]
        for chunk in chunks:
            self.remaining[chunk.index] = self.remaining.get(chunk.index, 1) - 1
            self.in_use[chunk.index] -= 1
            done = self.remaining[chunk.index] <= 0 and self.in_use[chunk.index] == 0
            if done and chunk.grad_C is None:  # a forward recomputed in its backward: keep it
                self.store.release(chunk)
        if not torch.is_grad_enabled():
            return
        fired = [False]

        def pre_backward(grad: torch.Tensor) -> torch.Tensor:
            if not fired[0]:
                fired[0] = True
                for chunk in chunks:
                    self.store.begin_backward(chunk)
            return grad

        for t in output_tensors(out):
            if t.requires_grad:
                t.register_hook(pre_backward)
