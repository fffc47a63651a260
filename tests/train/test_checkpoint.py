"""Engine checkpoints (torch.distributed.checkpoint) in one process: exact round trip of weights, optimizer,
scheduler and RNG; only trainable parameters saved; the `latest` pointer as the commit point; refusals of a
checkpoint that does not fit, an incomplete one and one of the previous format. Across world sizes and under FSDP:
tests/train/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlsi.common.errors import VlsiError
from vlsi.train.checkpoint import (latest_checkpoint, load_checkpoint, load_weights, read_trainable,
                                   save_checkpoint)
from vlsi.train.engine import lr_schedule


def _setup(seed: int):
    """A frozen layer (the same in every setup, as a model's frozen weights are) and trainable ones from ``seed``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    net[0].requires_grad_(False)  # frozen: not in the checkpoint
    head = nn.Linear(3, 2)
    modules = [("net", net), ("head", head)]
    params = [p for _, m in modules for p in m.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = lr_schedule(opt, total_steps=10, warmup_steps=2)
    return modules, opt, sched


def _train(modules, opt, sched, steps: int):
    (_, net), (_, head) = modules
    for _ in range(steps):
        loss = head(net(torch.randn(6, 5))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_is_exact_and_holds_trainable_parameters_only(tmp_path):
    modules, opt, sched = _setup(0)
    _train(modules, opt, sched, 3)
    d = save_checkpoint(tmp_path, 7, modules=modules, optimizer=opt, scheduler=sched, position={"micro": 3},
                        extra={"stage": "sft"})
    assert latest_checkpoint(tmp_path) == d
    weights = read_trainable(d)
    assert sorted(weights) == ["head.bias", "head.weight", "net.1.bias", "net.1.weight"]
    after = torch.rand(3)  # the RNG state comes back with the checkpoint
    other, opt2, sched2 = _setup(1)  # different weights, empty optimizer
    state = load_checkpoint(d, modules=other, optimizer=opt2, scheduler=sched2)
    assert state["position"] == {"micro": 3} and state["extra"] == {"stage": "sft"}
    assert torch.equal(torch.rand(3), after)
    for (_, a), (_, b) in zip(modules, other):
        for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            if pa.requires_grad:
                assert torch.equal(pa, pb), na
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1[k][name], s2[k][name])


def test_continues_exactly_after_a_resume(tmp_path):
    ref = _setup(0)
    torch.manual_seed(5)
    _train(*ref, 4)
    run = _setup(0)
    torch.manual_seed(5)
    _train(*run, 2)
    d = save_checkpoint(tmp_path, 2, modules=run[0], optimizer=run[1], scheduler=run[2], position={})
    fresh = _setup(3)
    torch.manual_seed(11)  # the checkpoint brings the RNG state back
    load_checkpoint(d, modules=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    _train(*fresh, 2)
    for (_, a), (_, b) in zip(ref[0], fresh[0]):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)


def test_keep_and_the_latest_pointer(tmp_path):
    modules, opt, sched = _setup(0)
    _train(modules, opt, sched, 1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, modules=modules, optimizer=opt, scheduler=sched, position={}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert not list(tmp_path.glob(".tmp_*"))


def test_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    modules, opt, sched = _setup(0)
    _train(modules, opt, sched, 1)
    d = save_checkpoint(tmp_path, 1, modules=modules, optimizer=opt, scheduler=sched, position={})
    modules[0][1][0].requires_grad_(True)  # one more trainable layer than the checkpoint holds
    with pytest.raises(VlsiError, match=r"does not fit the trainable parameters \(missing \['net.0.bias'"):
        load_checkpoint(d, modules=modules, optimizer=opt, scheduler=sched)
    assert load_weights(d, modules) is False  # a stage hand-over only loads an exact fit


def test_refuses_incomplete_and_previous_format_checkpoints(tmp_path):
    modules, opt, sched = _setup(0)
    _train(modules, opt, sched, 1)
    d = save_checkpoint(tmp_path, 1, modules=modules, optimizer=opt, scheduler=sched, position={})
    (d / "dcp" / ".metadata").unlink()  # a save cut short
    with pytest.raises(VlsiError, match="incomplete"):
        latest_checkpoint(tmp_path)
    old = tmp_path / "step_00000009"
    old.mkdir()
    (old / "trainable.safetensors").write_bytes(b"")
    (old / "state.pt").write_bytes(b"")
    (tmp_path / "latest").write_text(old.name + "\n")
    with pytest.raises(VlsiError, match="trainable.safetensors: a checkpoint of the single-file format"):
        latest_checkpoint(tmp_path)
    (old / "meta.json").write_text('{"format": 3}')  # written by a later version
    with pytest.raises(VlsiError, match="checkpoint format 3; this version reads format 2"):
        latest_checkpoint(tmp_path)
