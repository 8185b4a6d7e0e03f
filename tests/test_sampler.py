"""The rCM sampler against the spec's numbers (upstream-spec §6)."""

import pytest
import torch

from turbovideo.pipeline.sampler import expert_per_step, network_timestep, rf_times, sample

MID_TIMES = [0.9337810614, 0.8528953948, 0.6089790492]


@pytest.mark.parametrize(
    ("sigma_max", "first"), [(80.0, 0.9876543210), (200.0, 0.9950248756), (1600.0, 0.9993753904)]
)
def test_rectified_flow_times(sigma_max, first):
    times = rf_times(sigma_max, 4)
    assert times.dtype == torch.float64
    assert times.tolist() == pytest.approx([first, *MID_TIMES, 0.0], abs=1e-10)
    assert rf_times(sigma_max, 1).tolist() == pytest.approx([first, 0.0], abs=1e-10)
    assert rf_times(sigma_max, 3).tolist() == pytest.approx([first, *MID_TIMES[:2], 0.0], abs=1e-10)


@pytest.mark.parametrize(
    ("sigma_max", "expected"),
    [(80.0, [988, 932, 852, 608]), (200.0, [996, 932, 852, 608]), (1600.0, [1000, 932, 852, 608])],
)
def test_network_timesteps_are_bf16_rounded(sigma_max, expected):
    times = rf_times(sigma_max, 4)[:-1].tolist()
    steps = [network_timestep(t, batch=2) for t in times]
    assert all(s.dtype == torch.bfloat16 and s.shape == (2,) for s in steps)
    assert [s[0].item() for s in steps] == expected


@pytest.mark.parametrize(
    ("num_steps", "expected"), [(1, [0]), (2, [0, 0]), (3, [0, 0, 1]), (4, [0, 0, 1, 1])]
)
def test_i2v_expert_switch(num_steps, expected):
    assert expert_per_step(rf_times(200.0, num_steps), boundary=0.9) == expected


def test_expert_switch_is_final_and_follows_boundary():
    times = rf_times(200.0, 4)
    assert expert_per_step(times, boundary=0.94) == [0, 1, 1, 1]
    assert expert_per_step(times, boundary=0.999) == [1, 1, 1, 1]
    assert expert_per_step(times, boundary=0.5) == [0, 0, 0, 0]
    # A small sigma_max puts the first time below the later ones (0.091, then 0.934, ...): the low-noise
    # expert that took over at the first step keeps every later one.
    assert expert_per_step(rf_times(0.1, 4), boundary=0.9) == [1, 1, 1, 1]
    # A boundary equal to a step's time keeps the high-noise expert on that step (t_cur < boundary).
    assert expert_per_step(times, boundary=times[1].item()) == [0, 0, 1, 1]


def test_the_timestep_goes_through_fp32_before_bf16():
    # fp32(t) = 0.2005000114...: 1000 x it rounds up to 201 in bf16, where 1000 x t itself gives 200.
    assert network_timestep(0.20050000438686255).item() == 201


def test_invalid_step_count():
    with pytest.raises(ValueError, match="num_steps"):
        rf_times(80.0, 5)


def _ideal_velocity(x0: torch.Tensor):
    """The velocity a perfect network predicts on the straight path x_t = (1 - t) x0 + t eps."""

    def velocity(step, x, timestep):
        t = timestep[0].double() / 1000
        return (x.double() - x0) / t

    return velocity


@pytest.mark.parametrize("ode", [False, True])
def test_perfect_velocity_lands_on_the_data(ode):
    x0 = torch.linspace(-1, 1, 2 * 16 * 2 * 3 * 4, dtype=torch.float64).reshape(2, 16, 2, 3, 4)
    generator = torch.Generator().manual_seed(7)
    out = sample(_ideal_velocity(x0), x0.shape, rf_times(80.0, 4), generator, ode=ode)
    assert out.dtype == torch.float32
    # bf16 network inputs and timesteps leave a few-percent error, not noise-sized error.
    assert (out.double() - x0).abs().max() < 0.1


def _toy_velocity(step, x, timestep):
    return x.float() * 0.5 + timestep.float()[:, None, None, None, None] / 1000


def test_sde_update_and_draw_order_by_hand():
    shape = (2, 16, 2, 4, 4)
    times = rf_times(80.0, 4)
    calls = []

    def velocity(step, x, timestep):
        calls.append((step, x.dtype, timestep.tolist()))
        return _toy_velocity(step, x, timestep)

    out = sample(velocity, shape, times, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).double() * times[0]
    for i in range(4):
        t_cur, t_next = times[i], times[i + 1]
        v = _toy_velocity(i, x.to(torch.bfloat16), network_timestep(t_cur.item(), 2)).double()
        noise = torch.randn(shape, generator=g)
        x = (1 - t_next) * (x - t_cur * v) + (t_next.float() * noise).double()
    assert torch.equal(out, x.float())
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert all(c[1] == torch.bfloat16 for c in calls)
    assert [c[2][0] for c in calls] == [988, 932, 852, 608]
    # Exactly 1 + 4 draws were taken: the next draw of both generators agrees.
    follow = torch.Generator().manual_seed(3)
    for _ in range(5):
        torch.randn(shape, generator=follow)
    assert torch.equal(torch.randn(3, generator=follow), torch.randn(3, generator=g))


def test_ode_update_by_hand_draws_only_the_initial_noise():
    shape = (1, 16, 1, 2, 2)
    times = rf_times(200.0, 3)
    g_run = torch.Generator().manual_seed(11)
    out = sample(_toy_velocity, shape, times, g_run, ode=True)

    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g).double() * times[0]
    for i in range(3):
        v = _toy_velocity(i, x.to(torch.bfloat16), network_timestep(times[i].item(), 1)).double()
        x = x - (times[i] - times[i + 1]) * v
    assert torch.equal(out, x.float())
    assert torch.equal(torch.randn(3, generator=g_run), torch.randn(3, generator=g))


def test_sde_and_ode_differ_and_seed_matters():
    shape = (1, 16, 1, 2, 2)
    times = rf_times(80.0, 4)
    sde = sample(_toy_velocity, shape, times, torch.Generator().manual_seed(1))
    ode = sample(_toy_velocity, shape, times, torch.Generator().manual_seed(1), ode=True)
    again = sample(_toy_velocity, shape, times, torch.Generator().manual_seed(1))
    other = sample(_toy_velocity, shape, times, torch.Generator().manual_seed(2))
    assert torch.equal(sde, again)
    assert not torch.equal(sde, ode)
    assert not torch.equal(sde, other)


def test_on_step_reports_every_step():
    seen = []
    sample(
        _toy_velocity,
        (1, 16, 1, 2, 2),
        rf_times(80.0, 3),
        torch.Generator().manual_seed(0),
        on_step=seen.append,
    )
    assert seen == [0, 1, 2]
