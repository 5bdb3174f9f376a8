"""Hook points: many listeners, removable handles, edits before observers, clear contract errors."""
from __future__ import annotations

import pytest
import torch

from workbench.hooks import HookError, HookPoint, hook_points


def test_listeners_run_in_order_and_handles_remove_exactly_one():
    p = HookPoint()
    seen = []
    h1 = p.add(lambda point, x: seen.append(("a", int(x))))
    h2 = p.add(lambda point, x: seen.append(("b", int(x))))
    p(x=torch.tensor(1))
    h1.remove()
    h1.remove()  # idempotent
    p(x=torch.tensor(2))
    with p.add(lambda point, x: seen.append(("c", int(x)))):
        p(x=torch.tensor(3))
    assert p.active and not h1.active and h2.active
    h2.remove()
    assert not p.active
    assert seen == [("a", 1), ("b", 1), ("b", 2), ("b", 3), ("c", 3)]


def test_a_listener_added_or_removed_during_a_call_changes_only_later_calls():
    p = HookPoint()
    seen, handles = [], {}

    def once(point, x):  # removes itself and adds another listener, mid-call
        seen.append(("once", int(x)))
        handles["once"].remove()
        handles["late"] = point.add(lambda point, x: seen.append(("late", int(x))))

    handles["once"] = p.add(once)
    p.add(lambda point, x: seen.append(("b", int(x))))
    p(x=torch.tensor(1))
    p(x=torch.tensor(2))
    assert seen == [("once", 1), ("b", 1), ("b", 2), ("late", 2)]


def test_edits_run_before_observers_whatever_the_order_they_were_added():
    p = HookPoint(editable=("x",))
    seen = []
    p.add(lambda point, x, y: seen.append((x.tolist(), y)))  # an observer first
    p.add(lambda point, x, y: {"x": x * 10}, edit=True)
    p.add(lambda point, x, y: {"x": x + 1}, edit=True)  # edits chain in the order added
    out = p(x=torch.tensor([1, 2]), y="context")
    assert out["x"].tolist() == [11, 21] and seen == [([11, 21], "context")]


def test_edit_contract_errors_name_the_point_and_tensor():
    model = torch.nn.Module()
    model.block = torch.nn.Module()
    model.block.hook_x = HookPoint(editable=("x",))
    name, p = next(hook_points(model))
    assert name == "block.hook_x"
    with pytest.raises(HookError, match="no editable tensors"):
        HookPoint().add(lambda point: None, edit=True)
    with p.add(lambda point, x, y: {"y": y}, edit=True):
        with pytest.raises(HookError, match=r"block.hook_x: an edit listener returned 'y'; editable here: \['x'\]"):
            p(x=torch.zeros(2), y=torch.zeros(2))
    with p.add(lambda point, x: {"x": x.double()}, edit=True):
        with pytest.raises(HookError, match=r"block.hook_x: the edit of 'x' must keep \(2,\) torch.float32"):
            p(x=torch.zeros(2))
    with p.add(lambda point, x: None, edit=True):  # an edit listener may leave the tensors alone
        assert torch.equal(p(x=torch.ones(2))["x"], torch.ones(2))
