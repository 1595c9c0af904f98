"""Distillation from another run: hand-computed targets of progressive distillation, consistency
distillation and reflow; the frozen teacher contract (loading, checksum, clear errors); init_from;
the reflow pairs tool and data source."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import REPO, run_on_cpu_devices

from shortcut_jax import (
    checkpoint,
    config_lib,
    configs,
    data,
    models,
    objectives,
    optim,
    sampling,
    sharding,
    steps,
    teacher,
    train,
)
from shortcut_jax.data import pairs
from shortcut_jax.objectives import consistency_distillation, progressive_distillation, reflow
from shortcut_jax.state import TrainState, init_state
from shortcut_jax.tools import reflow_pairs

SETTINGS = objectives.ObjectiveConfig(
    name="progressive_distillation",
    denoise_timesteps=8,
    bootstrap_every=8,
    bootstrap_cfg=False,
    cfg_scale=1.0,
    class_dropout_prob=0.0,
    target_clip=0.0,
    num_classes=0,
    distill_stage_steps=(4, 2, 1),
    distill_steps_per_stage=10,
    distill_scales=5,
)


def linear_velocity(params, x, t, d, labels):
    """A teacher whose velocity is a x + b t + c d (a hand-checkable field)."""
    del labels
    a, b, c = params["a"], params["b"], params["c"]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return a * x + b * t.reshape(shape) + c * d.reshape(shape)


def other_velocity(params, x, t, d, labels):
    """The student's own network: a different field, so the test sees which one was used."""
    del labels, d
    return params["w"] * x - t.reshape((-1,) + (1,) * (x.ndim - 1))


def toy_batch(batch_size: int = 6) -> dict:
    points = np.random.default_rng(0).uniform(-1, 1, (batch_size, 2)).astype(np.float32)
    return {"image": jnp.asarray(points), "label": jnp.zeros((batch_size,), jnp.int32)}


def two_euler_steps(velocity, x, t, d):
    """The reference: two explicit Euler steps of size d (float64)."""
    x_mid = x + d * velocity(x, t, d)
    return x_mid + d * velocity(x_mid, t + d, d)


# --------------------------------------------------------------------- progressive distillation
def test_progressive_target_is_the_two_teacher_step_point():
    run_params = {"a": 0.5, "b": -1.0, "c": 2.0}
    run = objectives.TeacherRun(
        params=run_params, student={"w": 3.0}, apply_fn=linear_velocity, denoise_timesteps=8
    )
    regression, metrics = progressive_distillation.progressive_distillation_targets(
        other_velocity, run, toy_batch(), jax.random.PRNGKey(1), SETTINGS, step=0
    )
    # Stage 0: the student takes 4 steps (d = 1/4) on the grid t in {0, 1/4, 2/4, 3/4}; the
    # teacher run takes two steps of 1/8.
    np.testing.assert_allclose(regression.d, 0.25)
    np.testing.assert_allclose(np.asarray(regression.t) * 4, np.round(np.asarray(regression.t) * 4))
    x = np.asarray(regression.x_t, np.float64)
    t = np.asarray(regression.t, np.float64)[:, None]

    def teacher_field(x, t, d):
        return 0.5 * x - 1.0 * t + 2.0 * d

    x_end = two_euler_steps(teacher_field, x, t, 0.125)
    np.testing.assert_allclose(regression.target, (x_end - x) / 0.25, rtol=1e-5, atol=1e-6)
    # The student's one step of 1/4 along its target lands on the two-teacher-step point.
    np.testing.assert_allclose(x + 0.25 * np.asarray(regression.target), x_end, atol=1e-5)
    assert float(metrics["distill_student_steps"]) == 4.0


def test_progressive_later_stages_distil_the_previous_student():
    run = objectives.TeacherRun(
        params={"a": 0.5, "b": -1.0, "c": 2.0},
        student={"w": 3.0},
        apply_fn=linear_velocity,
        denoise_timesteps=8,
    )
    regression, metrics = progressive_distillation.progressive_distillation_targets(
        other_velocity, run, toy_batch(), jax.random.PRNGKey(2), SETTINGS, step=10
    )
    assert float(metrics["distill_stage"]) == 1.0
    np.testing.assert_allclose(regression.d, 0.5)
    x = np.asarray(regression.x_t, np.float64)
    t = np.asarray(regression.t, np.float64)[:, None]
    x_end = two_euler_steps(lambda x, t, d: 3.0 * x - t, x, t, 0.25)
    np.testing.assert_allclose(regression.target, (x_end - x) / 0.5, rtol=1e-5, atol=1e-6)


def test_progressive_stage_teacher_is_copied_at_the_end_of_each_stage():
    rates = [float(progressive_distillation.stage_teacher_rate(s, SETTINGS)) for s in range(35)]
    # After steps 9 and 19 the student becomes the teacher (rate 0 = copy); never after the last
    # stage began, and the stage's teacher is kept (rate 1) everywhere else.
    assert [s for s, rate in enumerate(rates) if rate == 0.0] == [9, 19]
    assert all(rate in (0.0, 1.0) for rate in rates)
    counts = [int(progressive_distillation.student_steps(s, SETTINGS)) for s in (0, 9, 10, 29, 99)]
    assert counts == [4, 4, 2, 1, 1]


def test_default_stage_schedule_halves_from_half_the_denoise_timesteps():
    config = configs.base_config()
    config.denoise_timesteps = 16
    config.total_steps = 400
    assert objectives.stage_steps(config) == (8, 4, 2, 1)
    assert objectives.steps_per_stage(config) == 100


def progressive_config(total_steps: int = 35) -> object:
    config = configs.base_config()
    config.objective = "progressive_distillation"
    config.denoise_timesteps = 8
    config.total_steps = total_steps
    config.teacher.steps_per_stage = 10  # stages of 4, 2 and 1 student steps; the last runs to 35
    config.optim.warmup_steps = 5  # capped at a tenth of a stage: 1 step
    config.optim.schedule = "cosine"
    return config


def test_progressive_learning_rate_schedule_restarts_at_every_stage():
    config = progressive_config()
    schedule = optim.learning_rate_schedule(config)
    lr = [float(schedule(step)) for step in range(35)]
    peak = config.optim.learning_rate
    assert lr[0] == lr[10] == lr[20] == 0.0  # each stage warms up from 0 again
    assert lr[1] == pytest.approx(peak) and lr[11] == pytest.approx(peak)
    np.testing.assert_allclose(lr[0:10], lr[10:20])  # stage 0 and 1: the same 10-step schedule
    assert lr[9] < 0.1 * peak  # decayed by the end of a stage
    # The last stage decays over the 15 steps left, not 10.
    assert lr[21] == pytest.approx(peak) and lr[29] > lr[9] and lr[34] < 0.05 * peak
    assert objectives.get("shortcut").stages is None  # other objectives: one schedule
    single = optim.learning_rate_schedule(toy_config("flow_matching", total_steps=35))
    assert float(single(10)) > 0.0


def test_progressive_sampling_ema_starts_afresh_at_every_stage():
    config = progressive_config()
    config.ema_rate = 0.5
    update = steps.make_update_fn(config, optax.sgd(1.0))
    state = TrainState(
        step=jnp.array(0, jnp.int32),
        params=jnp.array(0.0),
        opt_state=optax.sgd(1.0).init(jnp.array(0.0)),
        ema_params=jnp.array(100.0),
        teacher_params=jnp.array(0.0),
        rng=jax.random.PRNGKey(0),
    )
    history = []
    for _ in range(25):
        state = update(state, jnp.array(-1.0))  # params go up by 1 per step
        history.append((float(state.params), float(state.ema_params)))
    # The first update of each stage (steps 0, 10, 20) copies the params into the EMA.
    for first in (0, 10, 20):
        assert history[first][1] == history[first][0], history[first]
    # Within a stage it is an EMA at ema_rate of that stage's params only.
    assert history[1][1] == pytest.approx(0.5 * history[0][1] + 0.5 * history[1][0])
    assert history[11][1] == pytest.approx(0.5 * 11.0 + 0.5 * 12.0)


# --------------------------------------------------------------------- consistency distillation
def karras_sigma(t, settings):
    low = settings.consistency_sigma_min ** (1 / settings.consistency_rho)
    high = settings.consistency_sigma_max ** (1 / settings.consistency_rho)
    return (high + t * (low - high)) ** settings.consistency_rho


def test_flow_teacher_ode_step_is_exact_for_a_point_mass():
    """For data at one point x*, the exact flow velocity is (x* - x) / (1 - s): its denoiser is
    x* and one Euler step of the VE ODE moves x* + sigma z exactly to x* + sigma' z."""
    target_point = jnp.array([[0.3, -0.7]], jnp.float32)

    def exact_velocity(x, s, d):
        del d
        return (target_point - x) / (1.0 - s)[:, None]

    z = jnp.array([[1.5, -0.5]], jnp.float32)
    sigma_from, sigma_to = jnp.array([2.0]), jnp.array([0.5])
    moved = consistency_distillation.euler_ode_step(
        exact_velocity, target_point + 2.0 * z, sigma_from, sigma_to, 1 / 128
    )
    np.testing.assert_allclose(moved, target_point + 0.5 * z, rtol=1e-5, atol=1e-6)


def test_heun_ode_step_is_second_order_on_a_linear_ode():
    """With D(x, sigma) = k x the ODE is dx/dsigma = (1 - k) x / sigma, solved by
    x(sigma) = x0 (sigma / sigma0)^(1 - k). Heun's error shrinks ~h^3 per step, Euler's ~h^2."""
    k = 0.4

    def velocity(x, s, d):  # a flow teacher whose denoiser D(x_sigma, sigma) is k x_sigma
        del d
        # D = x_f + (1 - s) v with x_f = s x_sigma  =>  v = (k x_sigma - s x_sigma) / (1 - s)
        x_sigma = x / s[:, None]
        return (k - s[:, None]) * x_sigma / (1.0 - s[:, None])

    x = jnp.array([[1.0, -2.0]], jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    errors = {}
    for name, step in consistency_distillation.ODE_SOLVERS.items():
        errors[name] = []
        for h in (0.4, 0.2):
            sigma_from, sigma_to = jnp.array([2.0]), jnp.array([2.0 - h])
            exact = x * ((2.0 - h) / 2.0) ** (1 - k)
            moved = step(velocity, x, sigma_from, sigma_to, 1 / 128)
            errors[name].append(float(jnp.max(jnp.abs(moved - exact))))
    assert errors["heun"][0] < errors["euler"][0] / 5
    assert errors["euler"][0] / errors["euler"][1] == pytest.approx(4, rel=0.25)
    assert errors["heun"][0] / errors["heun"][1] == pytest.approx(8, rel=0.25)


def test_the_distilled_students_f_is_x_at_sigma_min_and_its_denoiser_far_from_it():
    """The student is a velocity network in flow time: f(x, sigma_min) = x exactly, and where
    sigma >> sigma_min f is the network's own flow denoiser x_f + (1 - s) v (what a student copied
    from the teacher starts as)."""
    settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "name": "consistency_distillation"})
    params = {"a": -0.3, "b": 0.2, "c": 1.0}

    def network(x, t, d):
        return linear_velocity(params, x, t, d, None)

    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
    at_min = consistency_distillation.student_function(network, x, jnp.ones((3,)), settings)
    np.testing.assert_allclose(at_min, x, rtol=1e-6, atol=1e-6)
    t = jnp.zeros((3,))  # sigma_max = 80
    sigma = float(consistency_distillation.sigma_of(t, settings)[0])
    flow_s = 1 / (1 + sigma)
    denoised = x * flow_s + (1 - flow_s) * network(x * flow_s, jnp.full((3,), flow_s), t + 1 / 8)
    far = consistency_distillation.student_function(network, x, t, settings)
    np.testing.assert_allclose(far, denoised, rtol=1e-3, atol=1e-3)


def test_consistency_distillation_target_uses_the_target_network():
    settings = SETTINGS.__class__(
        **{**SETTINGS.__dict__, "name": "consistency_distillation", "distill_ode_solver": "euler"}
    )
    run = objectives.TeacherRun(
        params={"a": -0.3, "b": 0.2, "c": 1.0},
        student={"w": 0.25},
        apply_fn=linear_velocity,
        denoise_timesteps=8,
    )
    batch = toy_batch()
    regression, _ = consistency_distillation.consistency_distillation_targets(
        other_velocity, run, batch, jax.random.PRNGKey(3), settings
    )
    # Hand computation in float64: the student's input is x_sigma at flow time 1 / (1 + sigma);
    # recover n from sigma, then one Euler ODE step of the flow teacher from sigma_{n+1} to
    # sigma_n, then the target network's f at sigma_n.
    n_scales, sd, smin = 5, settings.consistency_sigma_data, settings.consistency_sigma_min
    flow_student = np.asarray(regression.t, np.float64)
    s_student = 1 / flow_student - 1
    t_grid = np.arange(n_scales) / (n_scales - 1)
    index = np.argmin(np.abs(karras_sigma(t_grid, settings)[None] - s_student[:, None]), axis=1)
    s_target = karras_sigma(t_grid[index] + 1 / (n_scales - 1), settings)
    np.testing.assert_allclose(regression.d, 1 / 8)

    def coeffs(sigma):  # f = a x + b v(x / (1 + sigma), 1 / (1 + sigma), 1 / T)
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        a = c_skip + (sigma - smin) / sigma * (1 / (1 + sigma) - sd**2 / (sigma**2 + sd**2))
        return a[:, None], ((sigma - smin) / (1 + sigma))[:, None]

    x_student = np.asarray(regression.x_t, np.float64) / flow_student[:, None]
    flow_s = flow_student[:, None]
    x_flow = x_student * flow_s
    velocity = -0.3 * x_flow + 0.2 * flow_s + 1.0 / 8
    denoised = x_flow + (1 - flow_s) * velocity
    x_hat = (
        x_student + (s_target - s_student)[:, None] * (x_student - denoised) / s_student[:, None]
    )

    def f_target_network(x, sigma):
        a, b = coeffs(sigma)
        flow = 1 / (1 + sigma[:, None])
        return a * x + b * (0.25 * x * flow - flow)

    f_target = f_target_network(x_hat, s_target)
    a_s, b_s = coeffs(s_student)
    np.testing.assert_allclose(regression.error_scale, b_s[:, 0], rtol=1e-5)
    f_student_target = a_s * x_student + b_s * np.asarray(regression.target)
    np.testing.assert_allclose(f_student_target, f_target, rtol=1e-4, atol=1e-5)
    # Another target network gives another target.
    moved, _ = consistency_distillation.consistency_distillation_targets(
        other_velocity, run.replace(student={"w": 0.5}), batch, jax.random.PRNGKey(3), settings
    )
    assert not np.allclose(moved.target, regression.target)
    # Heun (the default) takes its second slope at the Euler point: another, nearby target.
    heun_settings = SETTINGS.__class__(**{**settings.__dict__, "distill_ode_solver": "heun"})
    heun, _ = consistency_distillation.consistency_distillation_targets(
        other_velocity, run, batch, jax.random.PRNGKey(3), heun_settings
    )
    np.testing.assert_array_equal(heun.t, regression.t)
    assert not np.allclose(heun.target, regression.target)
    flow_t = 1 / (1 + s_target[:, None])
    velocity = -0.3 * x_hat * flow_t + 0.2 * flow_t + 1.0 / 8
    slope_end = (x_hat - (x_hat * flow_t + (1 - flow_t) * velocity)) / s_target[:, None]
    slope = (x_student - denoised) / s_student[:, None]
    x_heun = x_student + (s_target - s_student)[:, None] * (slope + slope_end) / 2
    np.testing.assert_allclose(
        a_s * x_student + b_s * np.asarray(heun.target),
        f_target_network(x_heun, s_target),
        rtol=1e-4,
        atol=1e-5,
    )


def test_reflow_target_is_the_straight_line_of_a_stored_pair():
    noise = jnp.array([[1.0, -2.0], [0.5, 0.5], [0.0, 3.0]], jnp.float32)
    sample = jnp.array([[0.2, 0.4], [-1.0, 1.0], [0.7, -0.1]], jnp.float32)
    batch = {"noise": noise, "image": sample, "label": jnp.zeros((3,), jnp.int32)}
    settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "name": "reflow"})
    regression, _ = reflow.reflow_targets(None, None, batch, jax.random.PRNGKey(4), settings)
    np.testing.assert_allclose(regression.target, [[-0.8, 2.4], [-1.5, 0.5], [0.7, -3.1]], 1e-6)
    t = np.asarray(regression.t)[:, None]
    np.testing.assert_allclose(regression.x_t, (1 - t) * noise + t * sample, rtol=1e-6)


# --------------------------------------------------------------------- teacher runs
def toy_config(objective: str = "flow_matching", total_steps: int = 30):
    config = configs.base_config()
    config.objective = objective
    config.total_steps = total_steps
    config.batch_size = 64
    config.denoise_timesteps = 8
    config.data.name = "toy2d"
    config.data.num_classes = 0
    config.model.name = "mlp"
    config.model.hidden_size = 32
    config.model.depth = 2
    config.optim.warmup_steps = 5
    config.log_every_steps = 10
    config.checkpoint_every_steps = total_steps
    config.sample_steps = (1, 4)
    config.sample_num = 8
    config.sample_cfg_scale = 1.0
    config.sample_every_steps = 0
    config.ema_rate = 0.9
    return config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> str:
    """A tiny flow-matching run on toy2d, shared by the tests below."""
    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    train.train_and_evaluate(toy_config(), workdir)
    return workdir


def one_device_mesh(config):
    return sharding.make_mesh(config, jax.devices()[:1])


def test_teacher_is_the_runs_sampling_model_and_its_checksum_is_stable(teacher_run):
    config = toy_config("consistency_distillation")
    config.teacher.workdir = teacher_run
    run = teacher.load_teacher(config, one_device_mesh(config))
    _, state = checkpoint.load_run(teacher_run)
    assert run.step == 30
    for ours, theirs in zip(
        jax.tree.leaves(run.params), jax.tree.leaves(state.ema_params), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert run.checksum == teacher.checksum(state.ema_params) != teacher.checksum(state.params)


def test_a_teacher_load_reads_only_the_model_fields_of_the_checkpoint(teacher_run):
    config, state = checkpoint.load_run(teacher_run)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state.params
    )
    manager = checkpoint.make_manager(teacher_run)
    try:
        only = checkpoint.restore_fields(manager, 30, {"params": abstract})
        assert list(only) == ["params"]
        for ours, theirs in zip(
            jax.tree.leaves(only["params"]), jax.tree.leaves(state.params), strict=True
        ):
            np.testing.assert_array_equal(ours, theirs)
        with pytest.raises(checkpoint.CheckpointError, match="checkpoints/30/state"):
            checkpoint.restore_fields(manager, 30, {"no_such_field": abstract})
    finally:
        manager.close()


def test_teacher_on_an_eight_device_mesh_gives_the_same_outputs(teacher_run, tmp_path):
    """The teacher restored onto a data=2, fsdp=4 mesh (parameters sharded over fsdp) in another
    process gives the outputs and checksum of the 1-device load."""
    config = toy_config("consistency_distillation")
    config.teacher.workdir = teacher_run
    run = teacher.load_teacher(config, one_device_mesh(config)).as_teacher()
    x = np.random.default_rng(5).normal(size=(8, 2)).astype(np.float32)
    t, d = np.linspace(0, 1, 8, dtype=np.float32), np.full((8,), 0.125, np.float32)
    expected = np.asarray(run.apply_fn(run.params, x, t, d, np.zeros(8, np.int32)))
    script = f"""
import json, sys
import numpy as np, jax
sys.path.insert(0, {str(REPO / "tests")!r})
from test_distillation import toy_config
from shortcut_jax import sharding, teacher
config = toy_config("consistency_distillation")
config.teacher.workdir = {teacher_run!r}
config.mesh.update({{"data": 2, "fsdp": 4, "tensor": 1}})
config.sharding_rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "tensor"))
mesh = sharding.make_mesh(config)
loaded = teacher.load_teacher(config, mesh)
run = loaded.as_teacher()
specs = sorted({{str(leaf.sharding.spec) for leaf in jax.tree.leaves(run.params)}})
x = np.random.default_rng(5).normal(size=(8, 2)).astype(np.float32)
t, d = np.linspace(0, 1, 8, dtype=np.float32), np.full((8,), 0.125, np.float32)
out = jax.jit(run.apply_fn)(run.params, x, t, d, np.zeros(8, np.int32))
print("RESULT " + json.dumps({{"out": np.asarray(out).tolist(), "checksum": loaded.checksum,
      "specs": specs, "devices": jax.device_count()}}))
"""
    stdout = run_on_cpu_devices(script, timeout=120)
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    other = json.loads(line[len("RESULT ") :])
    assert other["devices"] == 8
    assert any("fsdp" in spec for spec in other["specs"]), other["specs"]
    np.testing.assert_allclose(other["out"], expected, rtol=1e-5, atol=1e-6)
    assert other["checksum"] == teacher.load_teacher(config, one_device_mesh(config)).checksum


def test_missing_or_wrong_teacher_run_is_one_clear_error(teacher_run, tmp_path):
    config = toy_config("progressive_distillation")
    with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.workdir = ''"):
        config_lib.validate(config, device_count=1)
    config.teacher.workdir = str(tmp_path / "nowhere")
    with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.workdir = .*nowhere"):
        config_lib.validate(config, device_count=1)
    with pytest.raises(teacher.TeacherError, match=r"config\.teacher\.workdir = .*not a training"):
        teacher.load_teacher(config, one_device_mesh(config))
    config.teacher.workdir = teacher_run
    config.teacher.step = 7
    with pytest.raises(teacher.TeacherError, match=r"no checkpoint at step 7; saved: \[30\]"):
        teacher.load_teacher(config, one_device_mesh(config))
    config.teacher.step = 0
    image_config = configs.base_config()  # MNIST-shaped: the teacher models 2-D points
    run = teacher.load_teacher(config, one_device_mesh(config))
    with pytest.raises(teacher.TeacherError, match=r"config\.teacher\.workdir = .*\(2,\)"):
        teacher.check_fits(image_config, run, "config.teacher.workdir")
    config.teacher.stage_steps = (4, 1)
    with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.stage_steps"):
        config_lib.validate(config, device_count=1)


def test_resume_refuses_a_changed_teacher(teacher_run, tmp_path):
    config = toy_config("consistency_distillation")
    config.teacher.workdir = teacher_run
    run = teacher.load_teacher(config, one_device_mesh(config))
    teacher.record_or_check(config, str(tmp_path), run)
    record = json.loads((tmp_path / teacher.RECORD_NAME).read_text())
    assert record == {"workdir": run.workdir, "step": 30, "checksum": run.checksum}
    teacher.record_or_check(config, str(tmp_path), run)  # the same teacher: fine
    changed = teacher.LoadedRun(run.config, run.params, run.step, "0" * 16, run.workdir)
    with pytest.raises(teacher.TeacherError, match=r"config\.teacher\.workdir = .*changed"):
        teacher.record_or_check(config, str(tmp_path), changed)


def test_init_from_copies_params_and_ema_and_the_ema_into_the_target(teacher_run):
    config = toy_config("shortcut")
    config.bootstrap_teacher = "ema"
    config.init_from = teacher_run
    config_lib.validate(config, device_count=1)
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    state = init_state(config, model, optimizer)
    _, source = checkpoint.load_run(teacher_run)
    started = teacher.initialise_from(config, state, one_device_mesh(config))
    copies = (
        (started.params, source.params),
        (started.ema_params, source.ema_params),
        (started.teacher_params, source.ema_params),
    )
    for tree, expected in copies:
        for ours, theirs in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    assert int(started.step) == 0
    for moment in jax.tree.leaves(started.opt_state):  # the optimizer starts afresh
        np.testing.assert_array_equal(moment, np.zeros_like(moment))
    config.model.hidden_size = 16
    state = init_state(config, models.get_model(config), optimizer)
    with pytest.raises(teacher.TeacherError, match=r"config\.init_from = .*shapes"):
        teacher.initialise_from(config, state, one_device_mesh(config))


# --------------------------------------------------------------------- reflow pairs
def test_pairs_are_the_teachers_ode_and_resume_shard_by_shard(teacher_run, tmp_path):
    out = str(tmp_path / "pairs")
    metadata = reflow_pairs.write_pairs(teacher_run, out, 10, num_steps=4, shard_size=4, seed=3)
    assert metadata["num_shards"] == 3 and metadata["teacher"]["step"] == 30
    _, arrays = pairs.load_pairs(out)
    assert arrays["noise"].shape == arrays["sample"].shape == (10, 2)
    # Shard 1 is the teacher's 4-step Euler ODE solve from its noise.
    config, state = checkpoint.load_run(teacher_run)
    apply_fn = steps.make_apply_fn(models.get_model(config))
    expected = sampling.sample(
        apply_fn,
        state.ema_params,
        jnp.asarray(arrays["noise"][4:8]),
        jnp.zeros((4,), jnp.int32),
        num_steps=4,
        denoise_timesteps=8,
    )
    np.testing.assert_allclose(arrays["sample"][4:8], expected, rtol=1e-5, atol=1e-6)
    # A lost shard is redrawn identically; other settings are refused.
    os.remove(os.path.join(out, pairs.shard_name(1)))
    reflow_pairs.write_pairs(teacher_run, out, 10, num_steps=4, shard_size=4, seed=3)
    np.testing.assert_array_equal(pairs.load_pairs(out)[1]["sample"], arrays["sample"])
    with pytest.raises(reflow_pairs.cli_inputs.InputError, match=r"--out=.*steps"):
        reflow_pairs.write_pairs(teacher_run, out, 10, num_steps=2, shard_size=4, seed=3)

    train_config = toy_config("reflow")
    train_config.batch_size = 4
    train_config.data.pairs_dir = out
    config_lib.validate(train_config, device_count=1)
    source = pairs.PairSource(train_config)
    first = [source.batch(step)["noise"] for step in range(5)]
    resumed = source.iterate(3)
    np.testing.assert_array_equal(next(resumed)["noise"], first[3])
    # Steps 0-1 and the first half of step 2 cover the 10 pairs once (epoch 0).
    seen = np.concatenate(first[:3])[:10]
    np.testing.assert_array_equal(np.sort(seen[:, 0]), np.sort(arrays["noise"][:, 0]))
    halves = [pairs.PairSource(train_config, i, 2).batch(1)["noise"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), first[1])


def test_a_resumed_distillation_reloads_the_teacher_and_refuses_a_changed_one(
    teacher_run, tmp_path
):
    config = toy_config("consistency_distillation", total_steps=4)
    config.teacher.workdir = teacher_run
    config.checkpoint_every_steps = 2
    config.optim.warmup_steps = 0
    workdir = str(tmp_path / "student")
    train.train_and_evaluate(config, workdir)
    record = json.loads((tmp_path / "student" / teacher.RECORD_NAME).read_text())
    assert record["step"] == 30
    config.total_steps = 6
    config.resume_allow_changes = "total_steps"
    history = train.train_and_evaluate(config, workdir)  # resumes at step 4 with the same teacher
    assert sorted(history) == [6]
    record["checksum"] = "0" * 16  # as if the teacher run's parameters had changed
    (tmp_path / "student" / teacher.RECORD_NAME).write_text(json.dumps(record))
    config.total_steps = 8
    with pytest.raises(teacher.TeacherError, match=r"config\.teacher\.workdir = .*changed since"):
        train.train_and_evaluate(config, workdir)


def test_reflow_needs_pairs_and_only_reflow_reads_them(tmp_path):
    config = toy_config("reflow")
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.pairs_dir = ''.*reflow_pairs"):
        config_lib.validate(config, device_count=1)
    config = toy_config("flow_matching")
    config.data.pairs_dir = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.pairs_dir = .*'reflow'"):
        config_lib.validate(config, device_count=1)


def test_pair_runs_are_scored_against_real_data_not_the_teachers_samples(teacher_run, tmp_path):
    out = str(tmp_path / "pairs")
    reflow_pairs.write_pairs(teacher_run, out, 8, num_steps=2, shard_size=8)
    config = toy_config("reflow")
    config.data.pairs_dir = out
    real = pairs.PairSource(config).real_examples(5)["image"]
    config.data.pairs_dir = ""
    np.testing.assert_array_equal(real, data.get_source(config).real_examples(5)["image"])


@pytest.mark.parametrize("objective", ["progressive_distillation", "consistency_distillation"])
def test_a_distilled_student_starts_as_a_copy_of_the_teacher_model(teacher_run, objective):
    config = toy_config(objective)
    config.teacher.workdir = teacher_run
    model, optimizer = models.get_model(config), optim.make_optimizer(config)
    state = init_state(config, model, optimizer)
    _, source = checkpoint.load_run(teacher_run)  # the run samples with its EMA
    started = teacher.initialise_from(config, state, one_device_mesh(config))
    for tree in (started.params, started.ema_params, started.teacher_params):
        for ours, theirs in zip(
            jax.tree.leaves(tree), jax.tree.leaves(source.ema_params), strict=True
        ):
            np.testing.assert_array_equal(ours, theirs)
    config.teacher.init_student = False
    fresh = teacher.initialise_from(config, state, one_device_mesh(config))
    assert fresh is state
