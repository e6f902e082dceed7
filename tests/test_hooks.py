import pytest
import torch
from torch import nn

from rome.pipeline.core.hooks import StopForward, Trace, TraceDict, get_module, skipped


class Counter(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def net():
    torch.manual_seed(0)
    return nn.Sequential(Counter(4), nn.ReLU(), Counter(4), Counter(4))


def test_retain_input_and_output_are_what_the_module_saw():
    m, x = net(), torch.randn(2, 4)
    with Trace(m[2], retain_input=True, retain_output=True) as t:
        y = m(x)
    h = torch.relu(m[0].lin(x))
    assert torch.equal(t.input, h)
    assert torch.equal(t.output, m[2].lin(h))
    assert torch.equal(y, m[3].lin(t.output))


def test_edit_output_changes_downstream_and_hooks_are_removed():
    m, x = net(), torch.randn(2, 4)
    clean = m(x)
    with Trace(m[2], edit_output=lambda t: t * 0):
        patched = m(x)
    assert torch.equal(patched, m[3].lin(torch.zeros(2, 4)))
    assert torch.equal(m(x), clean)  # hooks gone after the block
    assert not m[2]._forward_hooks and not m[2]._forward_pre_hooks


def test_edit_input():
    m, x = net(), torch.randn(2, 4)
    with Trace(m[2], edit_input=lambda t: t + 1, retain_input=True) as t:
        y = m(x)
    h = torch.relu(m[0].lin(x)) + 1
    assert torch.equal(t.input, h) and torch.allclose(y, m[3].lin(m[2].lin(h)))


def test_stop_before_skips_the_module_itself_and_everything_after():
    m = net()
    with Trace(m[2], retain_input=True, stop=True) as t:
        m(torch.randn(2, 4))
    assert t.input is not None
    assert (m[0].calls, m[2].calls, m[3].calls) == (1, 0, 0)


def test_stop_after_when_output_is_needed():
    m = net()
    with Trace(m[2], retain_output=True, stop=True) as t:
        m(torch.randn(2, 4))
    assert t.output is not None and (m[2].calls, m[3].calls) == (1, 0)


def test_hooks_removed_even_when_forward_raises():
    m = net()
    with pytest.raises(ValueError):
        with Trace(m[2], retain_input=True):
            raise ValueError("boom")
    assert not m[2]._forward_pre_hooks


def test_trace_dict_stops_at_named_module_and_edits_each():
    m = net()
    x = torch.randn(2, 4)
    with TraceDict(
        m, ["0", "2", "3"], retain_output=True, stop="2", edit_output=lambda t, name: t * 2 if name == "0" else t
    ) as td:
        m(x)
    assert torch.allclose(td["0"].output, m[0].lin(x) * 2)
    assert td["3"].output is None and m[3].calls == 0
    with pytest.raises(KeyError):
        TraceDict(m, ["0"], stop="5")
    with pytest.raises(KeyError, match="not found"):
        get_module(m, "9.lin")


def test_stop_forward_does_not_escape():
    m = net()
    with Trace(m[0], stop=True):
        m(torch.randn(1, 4))
    with pytest.raises(StopForward):  # outside a Trace the exception is real
        raise StopForward


def test_skipped_modules_hand_on_the_given_output_without_running_and_come_back_after():
    m, x = net(), torch.randn(2, 4)
    known = torch.relu(m[0].lin(x))  # what m[0] and the ReLU would give
    seen = []
    handle = m[0].register_forward_hook(lambda mod, args, out: seen.append(out))
    with skipped([m[0], m[1]], lambda: known):
        y = m(x)
    assert torch.equal(y, m[3].lin(m[2].lin(known))) and m[0].calls == 0  # not run; its hook still fired
    assert len(seen) == 1 and seen[0] is known
    handle.remove()
    m[0].forward = offload = lambda t: m[0].lin(t) * 0  # an instance forward (accelerate's hooks) is put back
    with skipped([m[0]], lambda: known):
        m(x)
    assert m[0].forward is offload and "forward" not in m[1].__dict__
    del m[0].forward
    assert torch.equal(m(x), m[3].lin(m[2].lin(torch.relu(m[0].lin(x))))) and m[0].calls == 1
