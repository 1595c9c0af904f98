"""hlo_loops: FLOPs of loops that XLA's cost analysis counts once, counted once per trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shortcut_jax import hlo_loops

_TPU_STYLE = """HloModule m

%body.1 (p.0: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p.0 = (s32[], f32[8,8]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.0), index=0
  %two.1 = s32[] constant(2)
  %next.1 = s32[] add(%i.1, %two.1)
  %x.1 = f32[8,8] get-tuple-element(%p.0), index=1
  %y.1 = f32[8,8] dot(%x.1, %x.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t.1 = (s32[], f32[8,8]) tuple(%next.1, %y.1)
}

%cond.1 (p.1: (s32[], f32[8,8])) -> pred[] {
  %p.1 = (s32[], f32[8,8]) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.1), index=0
  %limit.1 = s32[] constant(8)
  ROOT %lt.1 = pred[] compare(%i.2, %limit.1), direction=LT
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]) tuple(%zero, %x)
  %loop = (s32[], f32[8,8]) while(%init), condition=%cond.1, body=%body.1
  ROOT %out = f32[8,8] get-tuple-element(%loop), index=1
}
"""


def test_a_counter_loop_is_expanded_into_one_call_per_trip():
    expanded, loops = hlo_loops.expand_loops(_TPU_STYLE, body_pattern="body")
    assert loops == [{"while": "loop", "body": "body.1", "trip": 4}]
    assert expanded.count("to_apply=%body.1") == 4 and " while(" not in expanded


def test_loops_not_matching_the_pattern_stay():
    expanded, loops = hlo_loops.expand_loops(_TPU_STYLE)  # not a collective matmul loop
    assert loops == [] and expanded == _TPU_STYLE.rstrip("\n")


def test_a_compiled_loop_costs_its_trips():
    def f(x):
        return jax.lax.fori_loop(0, 4, lambda i, y: jnp.tanh(y @ y), x)

    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    once = 2 * 64**3
    assert abs(cost["flops"] - once) < 0.01 * once  # XLA: the body once
    flops, loops = hlo_loops.loop_corrected_flops(compiled, cost, body_pattern=".")
    assert [loop["trip"] for loop in loops] == [4]
    assert abs(flops - 4 * once) < 0.01 * once
    # The default pattern leaves loops that are not FSDP's collective matmuls alone.
    assert hlo_loops.loop_corrected_flops(compiled, cost)[0] == cost["flops"]
