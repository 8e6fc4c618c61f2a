"""The ReLA loss and schedules against hand-computed values; the wrapper with a toy method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rela_pipeline.errors import RelaError
from rela_pipeline.rela import AdaptiveSchedule, ConstantSchedule, NoRelaSchedule, ReLA, alignment_loss, parse_schedule


def test_alignment_loss_matches_hand_computed_cosines():
    predictions = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    targets = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [3.0, 0.0]])
    # cosines: 1 (same direction), -1 (opposite), 0 (orthogonal) -> losses 0, 2, 1 -> mean 1
    assert alignment_loss(predictions, targets).item() == pytest.approx(1.0)
    assert alignment_loss(predictions[:1], targets[:1]).item() == pytest.approx(0.0, abs=1e-7)
    half = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, math.sqrt(3.0)]])  # 60 degrees
    assert alignment_loss(*half).item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError):
        alignment_loss(predictions, targets[:, :1])


def test_alignment_loss_is_scale_invariant_and_has_gradients():
    predictions = torch.randn(5, 4, requires_grad=True)
    targets = torch.randn(5, 4)
    loss = alignment_loss(predictions, targets)
    assert loss.item() == pytest.approx(alignment_loss(3.0 * predictions, 0.5 * targets).item(), abs=1e-6)
    loss.backward()
    assert predictions.grad is not None and predictions.grad.abs().sum() > 0


def test_adaptive_schedule_first_steps_by_hand():
    schedule = AdaptiveSchedule()
    assert schedule.active and schedule.rho == 0.0
    schedule.update(0.8, step=0, total_steps=100)
    # rho from the initial averages: exp(-(2.0 - 1.0)); then L_fast = 0.999*1 + 0.001*0.8, L_slow = 0.99*2 + 0.01*L_fast
    assert schedule.rho == pytest.approx(math.exp(-1.0))
    assert schedule.l_fast == pytest.approx(0.9998)
    assert schedule.l_slow == pytest.approx(1.98 + 0.009998)
    schedule.update(0.6, step=1, total_steps=100)
    assert schedule.rho == pytest.approx(math.exp(-(1.989998 - 0.9998)))
    assert schedule.l_fast == pytest.approx(0.999 * 0.9998 + 0.0006)
    assert schedule.active and schedule.switch_step is None


def _run(schedule: AdaptiveSchedule, losses) -> None:
    for step, loss in enumerate(losses):
        schedule.update(loss, step, len(losses))
        if not schedule.active:
            return


def test_adaptive_switch_fires_on_a_plateau_and_not_on_a_falling_loss():
    plateau = AdaptiveSchedule()
    _run(plateau, [1.0] * 20_000)  # L_fast already equals the loss: L_slow just has to decay to it
    assert not plateau.active and plateau.rho >= 0.995
    assert 400 < plateau.switch_step < 800  # 0.99^t * 1.0 <= -ln(0.995) ~ 0.005 at t ~ 528

    falling = AdaptiveSchedule()
    # A loss that keeps falling fast keeps L_slow above L_fast by ~100 * |dL_fast/dt| > 0.005.
    _run(falling, [1.0 - 1e-4 * t - 0.3 * (1 - math.exp(-t / 20_000)) for t in range(5000)])
    assert falling.active and falling.rho < 0.995

    fall_then_flat = AdaptiveSchedule()
    losses = [max(0.3, 1.0 - 2e-4 * t) for t in range(20_000)]  # falls for 3500 steps, then flat
    _run(fall_then_flat, losses)
    assert not fall_then_flat.active and fall_then_flat.switch_step > 3500


class _ImmediateRule:
    """The plateau rule as this package computed it before the lagged read (the same float64
    expressions): every step reads its loss at once (``float(loss)``, a host sync) and updates
    the averages before the next step."""

    def __init__(self) -> None:
        self.l_fast, self.l_slow, self.rho, self.switch_step = 1.0, 2.0, 0.0, None

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.rho = math.exp(-max(self.l_slow - self.l_fast, 0.0))
        self.l_fast = 0.999 * self.l_fast + (1.0 - 0.999) * float(loss)
        self.l_slow = 0.99 * self.l_slow + (1.0 - 0.99) * self.l_fast
        if self.rho >= 0.995:
            self.switch_step = step + 1


def test_adaptive_schedule_reading_losses_one_step_late_switches_on_the_same_step():
    """Scalar float32 tensors, as the training step gives them: the lagged read folds them into
    the averages later, and rho, the averages and the switch step are bit-identical to the rule
    that reads every loss at once; mid-run state reads (checkpoints) change nothing."""
    generator = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(6000, generator=generator)
    losses = [torch.tensor(max(0.35, 1.0 - 2.5e-4 * t), dtype=torch.float32) + noise[t] for t in range(6000)]
    reference, lagged = _ImmediateRule(), AdaptiveSchedule()
    for step, loss in enumerate(losses):
        reference.update(loss, step)
        lagged.update(loss, step, len(losses))
        if step % 997 == 0:  # a checkpoint reads the state mid-run
            assert lagged.state_dict() == {"l_fast": reference.l_fast, "l_slow": reference.l_slow, "rho": reference.rho, "switch_step": None}
        assert lagged.rho == reference.rho
        if reference.switch_step is not None:
            break
    assert reference.switch_step is not None and 2600 < reference.switch_step < len(losses)  # the plateau after step 2600 fires it
    assert lagged.switch_step == reference.switch_step and not lagged.active
    assert (lagged.l_fast, lagged.l_slow) == (reference.l_fast, reference.l_slow)  # the last ReLA loss folded in at the switch


def test_adaptive_schedule_round_trips_through_state_dict():
    first = AdaptiveSchedule()
    _run(first, [0.9] * 50)
    second = AdaptiveSchedule()
    second.load_state_dict(first.state_dict())
    first.update(0.7, 50, 100)
    second.update(0.7, 50, 100)
    assert first.state_dict() == second.state_dict()


def test_constant_and_no_rela_schedules():
    schedule = ConstantSchedule(0.25)
    schedule.start(0, 8)
    active = []
    for step in range(8):
        active.append(schedule.active)
        schedule.update(0.5, step, 8)
    assert active == [True, True, False, False, False, False, False, False]
    assert schedule.switch_step == 2
    full = ConstantSchedule(1.0)
    full.start(0, 4)
    for step in range(4):
        assert full.active
        full.update(0.5, step, 4)
    assert full.switch_step is None
    assert not NoRelaSchedule().active
    assert isinstance(parse_schedule("constant:0.3"), ConstantSchedule)
    for bad in ("constant:0", "constant:1.5", "constant:x", "sometimes"):
        with pytest.raises(RelaError):
            parse_schedule(bad)


class ToyMethod(nn.Module):
    """A user's SSL method: backbone + its own loss; counts momentum updates."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
        self.momentum_updates = 0

    def forward(self, views):
        a, b = self.backbone(views[0]), self.backbone(views[1])
        return (a - b).pow(2).mean()

    def update_momentum(self, step, total_steps):
        self.momentum_updates += 1


def test_rela_wraps_a_method_without_changing_it():
    method = ToyMethod()
    rela = ReLA(method, target_dim=3, schedule=ConstantSchedule(0.5), feature_dim=6)
    rela.schedule.start(0, 4)
    views = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    targets = torch.randn(2, 5)  # more stored components than used: the first 3 are taken
    out = rela(views, targets)
    expected = 0.5 * sum(alignment_loss(rela.transfer(method.backbone(v)), targets[:, :3]) for v in views)
    assert out.phase == "rela" and out.ssl_loss is None
    assert out.loss.item() == pytest.approx(expected.item())
    out.loss.backward()
    assert rela.transfer.weight.grad is not None
    for step in range(2):
        rela.step_end(out, step, 4)
    assert method.momentum_updates == 2  # momentum keeps running in the ReLA phase
    out = rela(views, targets)
    assert out.phase == "ssl" and out.rela_loss is None
    assert out.loss.item() == pytest.approx(method(views).item())
    with pytest.raises(RelaError):
        ReLA(nn.Linear(2, 2), target_dim=3)  # no backbone
    with pytest.raises(RelaError, match="unknown transfer mode 'fixed'"):
        ReLA(method, target_dim=3, feature_dim=6, transfer="fixed")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_byol_teacher_follows_its_momentum_schedule(schedule):
    from lightly.utils.scheduler import cosine_schedule

    from rela_pipeline.methods import build_method, teacher_momentum
    from rela_pipeline.models import build_backbone

    torch.manual_seed(0)
    byol = build_method("byol", build_backbone("convnet", cifar_stem=False), momentum_schedule=schedule)
    with torch.no_grad():
        for p in byol.backbone.parameters():
            p.add_(1.0)  # the student moves away from the teacher
    student = byol.backbone.features[0].weight.clone()
    teacher = byol.backbone_momentum.features[0].weight.clone()
    byol.update_momentum(5, 10)
    m = 0.99 if schedule == "constant" else cosine_schedule(5, 10, 0.99, 1.0)
    assert teacher_momentum(schedule, 0.99, 5, 10) == pytest.approx(m)
    assert 0.99 < cosine_schedule(5, 10, 0.99, 1.0) < 1.0
    assert torch.allclose(byol.backbone_momentum.features[0].weight, m * teacher + (1 - m) * student, atol=1e-6)
    with pytest.raises(RelaError, match="unknown teacher momentum schedule"):
        build_method("byol", build_backbone("convnet"), momentum_schedule="linear")
