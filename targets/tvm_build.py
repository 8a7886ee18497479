"""Compile a Relax module for a `TvmTarget`: the pass pipeline and the schedules.

Fast math (polynomial erf/exp/tanh, the softmax with the fast exp), library dispatch,
legalization and operator fusion (TVM's pipeline for the target), then graphopt's CPU
schedules (`tvm_schedule`) for every kernel (and the inits of possibly empty reductions hoisted
out of their loops), then TVM's lowering and finalization passes.
cuda: the same with dlight's GPU rules in place of the CPU schedules.
"""

from __future__ import annotations

from typing import Any, Optional

from graphopt.target_base import TargetError


def build(module: Any, target: Any, tuning_dims: Optional[dict[str, int]] = None) -> tuple[Any, Any]:
    """The `tvm.runtime.Executable` of `module` (a Relax IRModule) for `target` (a TvmTarget),
    and the `tvm_tuning.TuningReport` when `tuning_dims` (the static sizes `module` was built
    for) is given and the target has a tuning budget (else None); TargetError naming TVM's message where TVM fails."""
    try:
        return _build(module, target, tuning_dims)
    except RuntimeError as exc:  # TVM's errors (its passes fail on some graphs: FuseTIR on KV-cache decoders)
        raise _build_error(target, exc) from None


def _build_error(target: Any, exc: BaseException) -> TargetError:
    return TargetError(f"TVM could not build the model for {target.spec}: {last_line(str(exc)) or type(exc).__name__}")


def last_line(text: str) -> str:
    """The last non-blank line of a (TVM) message; "" for none. TVM ends its errors with the
    line that says what failed, after C++ frames."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _build(module: Any, target: Any, tuning_dims: Optional[dict[str, int]]) -> tuple[Any, Any]:
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight

    from graphopt.targets.tvm_schedule import hoist_reduction_inits

    tvm_target = target.tvm_target()
    with tvm_target:
        module = tvm.transform.Sequential(
            [relax.transform.FastMathTransform()]
            + relax.pipeline.library_dispatch_passes(tvm_target)
            + relax.pipeline.legalize_passes(tvm_target)
        )(module)
        report = None
        if tuning_dims is not None and target.tuning:
            from graphopt.targets.tvm_tuning import tune

            module, report = tune(module, target, tvm_target, tuning_dims)
        else:
            module = dlight.ApplyDefaultSchedule(*schedule_rules(target))(module)
        if target.variant != "cuda":
            module = hoist_reduction_inits(module)
        lowering = [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
        ]
        module = tvm.transform.Sequential(lowering + relax.pipeline.finalize_passes(tvm_target))(module)
    try:
        return tvm.compile(module, tvm_target, relax_pipeline=None), report
    except Exception as exc:
        raise _build_error(target, exc) from None


def schedule_rules(target: Any) -> list[Any]:
    """The hand schedule rules for `target` (a TvmTarget), first match wins: graphopt's CPU
    rules (`tvm_schedule`) for llvm, dlight's GPU rules for cuda."""
    from tvm.s_tir import dlight

    if target.variant == "cuda":
        return [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]
    from graphopt.targets.tvm_schedule import cpu_rules

    return cpu_rules()
