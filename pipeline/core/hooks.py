"""One hook utility for every stage: read or patch a module's input/output, or stop the forward.

The idea follows ROME's ``util/nethook.py``: instead of ad-hoc ``register_forward_hook`` calls
scattered over the code, every stage says *which* module it wants to see or change and wraps the
forward pass in a context manager.  Leaving the context always removes the hooks.

    with Trace(model.transformer.h[6].mlp.c_proj, retain_input=True, stop=True) as t:
        model(input_ids)          # stops right after the module (or before it, see below)
    keys = t.input                # [batch, tokens, d_ff]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["StopForward", "Trace", "TraceDict", "get_module", "hidden_of", "replace_hidden", "skipped"]


class StopForward(Exception):
    """Raised inside a hook to abandon the rest of a forward pass; swallowed by the owning Trace."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule`` with an error that names the missing path."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"module '{name}' not found in {type(model).__name__}") from err


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (blocks and attentions may return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping the rest of a tuple intact."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


EditFn = Callable[[torch.Tensor], torch.Tensor]


class Trace(contextlib.AbstractContextManager):
    """Hook one module for the duration of a ``with`` block.

    retain_input / retain_output: keep the module's first positional input / its (hidden) output.
    edit_input / edit_output:     functions ``tensor -> tensor`` applied to the first input / the hidden
                                  output before the rest of the network sees it.
    stop:                         end the forward pass at this module.  When nothing needs the module's
                                  own output, the pass stops *before* the module runs (a key-collecting
                                  pass never pays for the down-projection it reads the input of).
    detach:                       retained tensors are detached (the default; set False to backprop).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_input: EditFn | None = None,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.module = module
        self.retain_input, self.retain_output = retain_input, retain_output
        self.edit_input, self.edit_output = edit_input, edit_output
        self.stop, self.detach = stop, detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def _stop_before(self) -> bool:
        return self.stop and not self.retain_output and self.edit_output is None

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if self.edit_input is not None:
            x = self.edit_input(x)
            args = (x, *args[1:])
        if self.retain_input:
            self.input = self._keep(x)
        if self._stop_before:
            raise StopForward
        return args if self.edit_input is not None else None

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.edit_output is not None:
            output = replace_hidden(output, self.edit_output(hidden_of(output)))
        if self.retain_output:
            self.output = self._keep(hidden_of(output))
        if self.stop:
            raise StopForward
        return output

    def __enter__(self) -> Trace:
        if self.retain_input or self.edit_input is not None or self._stop_before:
            self._handles.append(self.module.register_forward_pre_hook(self._pre_hook))
        if self.retain_output or self.edit_output is not None or (self.stop and not self._stop_before):
            self._handles.append(self.module.register_forward_hook(self._hook))
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(dict, contextlib.AbstractContextManager):
    """Several ``Trace``s at once, keyed by module name; ``stop`` names the module that ends the pass.

    ``edit_output`` may be a mapping name -> function (or one function used for every name, called
    as ``fn(tensor, name)``)."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: Mapping[str, EditFn] | Callable[[torch.Tensor, str], torch.Tensor] | None = None,
        stop: str | None = None,
        detach: bool = True,
    ) -> None:
        super().__init__()
        for name in dict.fromkeys(names):
            if edit_output is None:
                edit = None
            elif isinstance(edit_output, Mapping):
                edit = edit_output.get(name)
            else:
                edit = (lambda fn, n: lambda t: fn(t, n))(edit_output, name)
            self[name] = Trace(
                get_module(model, name),
                retain_input=retain_input,
                retain_output=retain_output,
                edit_output=edit,
                stop=(name == stop),
                detach=detach,
            )
        if stop is not None and stop not in self:
            raise KeyError(f"stop module '{stop}' is not among the traced modules")

    def __enter__(self) -> TraceDict:
        for t in self.values():
            t.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        for t in self.values():
            t.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def skipped(modules: Sequence[nn.Module], output: Callable[[], Any]) -> Iterator[None]:
    """Run forwards without computing ``modules``: inside the block each returns ``output()`` instead (its hooks
    still fire). For blocks whose result is known already, such as the blocks before the first edited one in a
    many-edit run. A ``forward`` set on the instance (accelerate's offload hooks) is put back on exit."""
    saved = [m.__dict__.get("forward") for m in modules]

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return output()

    try:
        for m in modules:
            m.forward = stand_in
        yield
    finally:
        for m, forward in zip(modules, saved):
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
