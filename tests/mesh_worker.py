"""Trains the tiny MNIST config on a given mesh in its own process (run by test_sharding.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py \
        --mesh data=2,fsdp=4,tensor=1 --workdir DIR --steps 3 [--resume_mesh ...]

Prints one JSON line: the logged losses, the mesh shape, and the bytes of the train state each
device holds (summed from the arrays' addressable shards) and in all. With
`--objectives meanflow,diffusion,...` it trains each of those objectives instead (in
DIR/<objective>) and prints their losses; objectives that distil a teacher run (or train on its
reflow pairs) use the flow-matching run and pairs in `--teacher_dir`, which the first worker that
needs them trains and writes. `--coordinator_address/--num_processes/--process_id` make it one
process of a multi-process run (jax.distributed, gloo collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import tiny_mnist_config  # noqa: E402

from shortcut_jax import distributed, models, objectives, optim, sharding, train  # noqa: E402
from shortcut_jax.state import init_state, sharded_abstract_state  # noqa: E402


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        axis, size = part.split("=")
        sizes[axis] = int(size)
    return sizes


def state_bytes_per_device(config) -> dict[str, int]:
    """Initialises the state on the mesh and sums each device's shard bytes."""
    mesh = sharding.make_mesh(config)
    model = models.get_model(config)
    optimizer = optim.make_optimizer(config)
    _, shardings = sharded_abstract_state(config, model, optimizer, mesh)
    state = jax.jit(lambda: init_state(config, model, optimizer), out_shardings=shardings)()
    per_device: dict[str, int] = {}
    total = 0
    for leaf in jax.tree.leaves(state):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    params_total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    params_per_device = {}
    for leaf in jax.tree.leaves(state.params):
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            params_per_device[key] = params_per_device.get(key, 0) + shard.data.nbytes
    return {
        "state_total": total,
        "state_per_device": per_device,
        "params_total": params_total,
        "params_per_device": params_per_device,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bootstrap_teacher", default="params")
    parser.add_argument("--objectives", default="")
    parser.add_argument("--teacher_dir", default="")
    parser.add_argument("--coordinator_address", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args()
    if args.coordinator_address:
        distributed.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id
        )
    if args.objectives:
        train_objectives(args)
        return

    config = tiny_mnist_config(args.steps)
    config.mesh.update(parse_mesh(args.mesh))
    config.bootstrap_teacher = args.bootstrap_teacher
    history = train.train_and_evaluate(config, args.workdir)
    result = {
        "mesh": dict(sharding.make_mesh(config).shape),
        "losses": {str(step): summary["loss"] for step, summary in history.items()},
        "bytes": state_bytes_per_device(config),
        "process_index": jax.process_index(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def ensure_teacher(args: argparse.Namespace) -> tuple[str, str]:
    """(run, pairs): a 30-step flow-matching run of the tiny config (no warm-up, sampled with its
    raw parameters, so its outputs are far from the zero-initialised ones) and 32 of its 2-step
    reflow pairs in --teacher_dir (default DIR/teacher), made here unless they exist."""
    from shortcut_jax.tools import reflow_pairs

    teacher_dir = args.teacher_dir or os.path.join(args.workdir, "teacher")
    run_dir, pairs_dir = os.path.join(teacher_dir, "run"), os.path.join(teacher_dir, "pairs")
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        config = tiny_mnist_config(30)
        config.mesh.update(parse_mesh(args.mesh))
        config.objective = "flow_matching"
        config.optim.warmup_steps = 0
        config.optim.learning_rate = 1e-3
        config.sample_use_ema = False
        config.checkpoint_every_steps = 30
        train.train_and_evaluate(config, run_dir)
    if not os.path.isfile(os.path.join(pairs_dir, "pairs.json")):
        reflow_pairs.write_pairs(run_dir, pairs_dir, 32, num_steps=2, shard_size=16)
    return run_dir, pairs_dir


def train_objectives(args: argparse.Namespace) -> None:
    """Trains the tiny config with each objective of --objectives on the mesh; prints the losses."""
    losses = {}
    for objective in args.objectives.split(","):
        config = tiny_mnist_config(args.steps)
        config.mesh.update(parse_mesh(args.mesh))
        config.objective = objective
        config.bootstrap_teacher = args.bootstrap_teacher
        config.checkpoint_every_steps = args.steps
        entry = objectives.get(objective)
        if entry.needs_teacher_run or entry.uses_pairs:
            run_dir, pairs_dir = ensure_teacher(args)
            config.teacher.workdir = run_dir if entry.needs_teacher_run else ""
            config.data.pairs_dir = pairs_dir if entry.uses_pairs else ""
            # A fresh student distilling the run itself (stage 0) at every step: a student copied
            # from the teacher, or a later stage's barely trained teacher, gives losses of ~1e-13.
            config.teacher.init_student = False
            config.teacher.steps_per_stage = args.steps
        history = train.train_and_evaluate(config, os.path.join(args.workdir, objective))
        losses[objective] = {str(step): summary["loss"] for step, summary in history.items()}
    result = {"mesh": dict(sharding.make_mesh(config).shape), "objective_losses": losses}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
