"""Every method of the paper's comparison with the settings of its own paper, in one place.

    config = paper_settings.apply(base, "meanflow")   # objective + that paper's settings

A `Method` names the objective, the config fields its paper sets (everything else, the network,
batch, optimiser and schedule, is the run's own, the same for every method of a comparison),
where those settings come from, and each way ours differs from that paper with the reason.
`benchmarks/objectives_study.py` builds its runs from here, and BENCHMARKS.md lists the
deviations under its tables from here.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of the comparison.

    Attributes:
      objective: `config.objective`.
      overrides: {dotted config field: value} that its paper sets.
      source: the paper (and table or algorithm) the settings come from.
      deviations: settings that differ from that paper, each with the reason.
      two_stage: the method distils a flow-matching teacher run (a second training stage).
    """

    objective: str
    overrides: dict[str, Any]
    source: str
    deviations: tuple[str, ...] = ()
    two_stage: bool = False


# Listed once under every comparison table.
SHARED_DEVIATION = (
    "the comparison's network, batch, optimiser and learning-rate schedule (the same for every "
    "method) instead of each paper's own; the sampling EMA at the suite's rate, except that a "
    "distilled student that starts as its teacher averages over the same fraction of its "
    "shorter run (objectives_study.student_ema_rate) unless its paper sets none"
)

METHODS: dict[str, Method] = {
    "shortcut": Method(
        objective="shortcut",
        overrides={},
        source="Frans et al. 2025 (ICLR), section 4; the settings of the run's own config",
        deviations=(
            "with experiments/mnist.py: a quarter of the batch bootstraps (the paper: 1/8) with "
            "the current parameters as teacher (the paper's code: the EMA), the library's MNIST "
            "default chosen for a 20-minute CPU budget (BENCHMARKS section 11)",
        ),
    ),
    "flow_matching": Method(
        objective="flow_matching",
        overrides={},
        source="Lipman et al. 2023 / Liu et al. 2023 as in Frans et al. 2025's baseline: t on the "
        "1/128 grid, Euler sampling",
    ),
    "diffusion": Method(
        objective="diffusion",
        overrides={"diffusion.schedule": "cosine", "diffusion.prediction": "eps"},
        source="DDPM (Ho et al. 2020) with the cosine schedule (Nichol and Dhariwal 2021), sampled "
        "by deterministic DDIM (Song et al. 2021)",
    ),
    "consistency_training": Method(
        objective="consistency_training",
        overrides={"consistency.s0": 2, "consistency.s1": 150, "consistency.mu0": 0.9},
        source="Song et al. 2023, Algorithm 3 with its CIFAR-10 curriculum (s0 2, s1 150, mu0 0.9)",
        deviations=(
            "squared L2 instead of LPIPS: LPIPS needs pretrained VGG weights, which cannot be "
            "loaded offline (the paper reports L2 too)",
        ),
    ),
    "improved_consistency_training": Method(
        objective="improved_consistency_training",
        overrides={
            "consistency.s0": 10,
            "consistency.s1": 1280,
            "consistency.p_mean": -1.1,
            "consistency.p_std": 2.0,
            "loss.kind": "pseudo_huber",
        },
        source="Song and Dhariwal 2023 (iCT): pseudo-Huber loss, 1/(sigma_{n+1} - sigma_n) "
        "weights, lognormal noise schedule (-1.1, 2), exponential curriculum s0 10, s1 1280, no "
        "EMA target",
        deviations=(
            "multistep consistency sampling at every step count, not iCT's two-step sampler with "
            "its tuned mid point",
        ),
    ),
    "live_reflow": Method(
        objective="live_reflow",
        overrides={"live_reflow.steps": 8, "live_reflow.levels": "all"},
        source="Frans et al. 2025, section 5 'Live Reflow': 8 Euler steps of the model's own "
        "flow behind each target",
        deviations=(
            "every step size the sampler uses learns the reflow pairs; the official code "
            "(baselines/targets_livereflow.py) trains d = 1 only (live_reflow.levels='one_step')",
        ),
    ),
    "meanflow": Method(
        objective="meanflow",
        overrides={
            "meanflow.ratio_r_neq_t": 0.75,
            "meanflow.time_mean": -2.0,
            "meanflow.time_std": 2.0,
            "meanflow.adaptive_p": 0.75,
        },
        source="Geng et al. 2025, its pixel CIFAR-10 settings: 75 % r != t, logit-normal "
        "(-2, 2), adaptive weight p = 0.75",
        deviations=(
            "the adaptive weight's error is the per-element mean, so c = 1e-3 does not scale with "
            "the image size (the paper: the sum)",
            "step sizes below 1/128 embed as 1/128 (3.5 % of the examples at these settings; the "
            "target there differs from the instantaneous velocity by O(d))",
        ),
    ),
    "meanflow_imagenet": Method(
        objective="meanflow",
        overrides={
            "meanflow.ratio_r_neq_t": 0.25,
            "meanflow.time_mean": -0.4,
            "meanflow.time_std": 1.0,
            "meanflow.adaptive_p": 1.0,
        },
        source="Geng et al. 2025, its ImageNet-256 settings: 25 % r != t, logit-normal "
        "(-0.4, 1), p = 1",
    ),
    "progressive_distillation": Method(
        objective="progressive_distillation",
        overrides={"teacher.steps_per_stage": 0, "teacher.init_student": True, "ema_rate": 0.0},
        source="Salimans and Ho 2022, Algorithm 2: halving the student's steps stage by stage "
        "(64 -> 1), the student starting as the teacher, a fresh learning-rate schedule per "
        "stage, and no sampling EMA: each stage's student is scored from its own parameters "
        "(the official distillation configs set ema_decay 0)",
        deviations=(
            "the Adam moments carry over between stages",
            "velocity (flow) parametrisation with the 1 / (1 - t)^2-weighted x-space loss (module "
            "docstring), not the paper's v-prediction with truncated-SNR weights",
        ),
        two_stage=True,
    ),
    "consistency_distillation": Method(
        objective="consistency_distillation",
        overrides={
            "teacher.consistency_scales": 18,
            "teacher.target_ema_rate": 0.95,
            "teacher.ode_solver": "heun",
            "teacher.init_student": True,
        },
        source="Song et al. 2023, Algorithm 2 with its CIFAR-10 settings (N 18, mu 0.95, Heun), "
        "the student and its target network starting as the teacher (as the paper's code does)",
        deviations=(
            "squared L2 instead of LPIPS (no pretrained VGG weights offline)",
            "the consistency function is built on the flow teacher's denoiser (F = (D - "
            "c_skip_edm x) / c_out_edm, module docstring) instead of EDM's network output, so "
            "that the student can start as the teacher",
        ),
        two_stage=True,
    ),
    "reflow": Method(
        objective="reflow",
        overrides={},
        source="Liu et al. 2023 (2-rectified flow): the student regresses straight lines between "
        "noise and the teacher's samples, starting as the teacher (the rectified-flow code "
        "fine-tunes its 1-rectified flow: config.init_from, set by the study)",
        two_stage=True,
    ),
}


def get(name: str) -> Method:
    """The method called `name`; a ValueError naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def apply(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of `config` with method `name`'s objective and its paper's settings."""
    method = get(name)
    result = copy.deepcopy(config)
    result.objective = method.objective
    for field, value in method.overrides.items():
        node = result
        *parents, leaf = field.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return result
