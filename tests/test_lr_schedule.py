"""Learning-rate schedules of the training loop against torch's own schedulers."""

import pytest
import torch

from cvtasks.settings import OptimSection
from pipelines.steps import lr_factor, make_optimizer, set_learning_rate


def test_cosine_matches_torch_cosine_annealing_stepped_per_epoch():
    epochs = 5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    expected = []
    for _ in range(epochs):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [lr_factor("cosine", e, epochs) for e in range(epochs)] == pytest.approx(expected)
    assert expected[0] == 1.0 and expected[-1] == pytest.approx(0.0955, abs=1e-4)


def test_constant_keeps_the_base_rate_and_unknown_schedules_are_named():
    assert {lr_factor("constant", e, 3) for e in range(3)} == {1.0}
    with pytest.raises(ValueError, match='optim.schedule "step"'):
        lr_factor("step", 0, 3)


def test_set_learning_rate_keeps_each_groups_multiple():
    body, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optim = OptimSection(name="sgd", lr=0.01, schedule="constant", momentum=0.0, weight_decay=0.0)
    optimizer = make_optimizer([{"params": [body], "lr_mult": 1.0}, {"params": [head], "lr_mult": 10.0}], optim)
    set_learning_rate(optimizer, 0.005)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.05])
