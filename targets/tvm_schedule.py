"""CPU schedules for TVM kernels without tuning (dlight rules).

TVM 0.27's default CPU build runs every kernel as plain serial loops (MiniLM ~100x slower
than ONNX Runtime). `cpu_rules()` gives, in order of preference:

- `Matmul`: a (batched) matmul with an optional elementwise epilogue (bias, GELU, ...):
  register-blocked micro-kernel, `MR` rows x `NR_VECTORS` vector registers of columns,
  accumulated in a local tile over the whole reduction, the column panel outermost so a
  weight panel (pre-packed contiguous by `tvm_relax`) stays in cache while every row block
  streams past it, the outer loops parallel, the tile written back through the fused
  epilogue. A transposing producer of an operand is materialized, not inlined (inlined, the
  vector loads would be strided). A runtime-sized column count leaves the last panel
  predicated, which TVM does not vectorize: attention pads its key axis for this reason.
  Known cost: with a runtime row count (``batch * seq``) the same kernel measured 2.4x
  slower than with a static one ([seq, 384] x [384, 1536], one thread: 3.7-4.3 ms against
  1.6-1.8 ms, torch 1.6 ms). Padding the rows to whole tiles in TE removed the row
  predicate but not the cost (its LLVM IR had one more workspace allocation than the
  static build's, so the tile is likely not kept in registers). Not fixed in the symbolic
  build; the target's static buckets (`tune_shapes`) avoid it;
- dlight's CPU `Reduction` (softmax, layer norm, RMS norm) and `GEMV` (skipped for a kernel
  their analysis fails on);
- `Elementwise`: injective kernels with every loop fused, parallel and vectorized (pure
  reshapes excepted: Relax turns those into views).

A kernel with a loop of static extent 0 (a zero-size tensor, or a zero-size part of one
inside a fused kernel) is left as plain loops: fusing or splitting such a loop divides by
zero in TVM.
After the rules, `hoist_reduction_inits` moves the init of every reduction whose loops may
run zero times (a static extent of 0, or a runtime-sized one) out of those loops: TVM runs an
init left inside them on the first iteration only, so an empty reduction (ReduceSum over a
zero-size axis) would leave its output unwritten instead of 0 / -inf.
"""

from __future__ import annotations

from typing import Any, Optional

MR = 4
"""Rows of the register tile."""

NR_VECTORS = 2
"""Columns of the register tile, in vector registers."""


def cpu_rules() -> list[Any]:
    """The schedule rules applied to each CPU kernel, first match wins."""
    from tvm.s_tir import dlight

    return [_rule(_leave_empty), _rule(_schedule_matmul), _guarded(dlight.cpu.GEMV()), _guarded(dlight.cpu.Reduction()),
            _rule(_schedule_elementwise)]


def _guarded(rule: Any) -> Any:
    """dlight's `rule`, not applied (None) to a kernel its analysis fails on: its GEMV rule
    asserts that a GEMV-like kernel keeps a reduction loop, which one over an axis of 1 does
    not. The kernel itself is untouched (a rule schedules a copy), so the next rule takes it."""
    from tvm.s_tir import dlight
    from tvm.s_tir.schedule import ScheduleError

    class _Guarded(dlight.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Optional[Any]:
            try:
                return rule.apply(func, target, tunable)
            except (AssertionError, ScheduleError):
                return None

    _Guarded.__name__ = type(rule).__name__
    return _Guarded()


def _rule(fn: Any) -> Any:
    from tvm.s_tir import dlight

    class _Rule(dlight.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Optional[Any]:
            from tvm import s_tir, tirx
            from tvm.s_tir.schedule import ScheduleError

            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            try:
                return fn(sch, target)
            except ScheduleError:
                return None

    _Rule.__name__ = fn.__name__
    return _Rule()


def hoist_reduction_inits(module: Any) -> Any:
    """`module` with the init of each reduction that may be empty moved before its reduction
    loops, in every PrimFunc (see the module docstring)."""
    from tvm import s_tir, tirx

    updates = {}
    for gvar, func in module.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        if _hoist_inits(sch):
            updates[gvar] = sch.mod["main"]
    for gvar, func in updates.items():
        module[gvar] = func
    return module


def _hoist_inits(sch: Any) -> bool:
    """Decompose the reductions of `sch` whose reduction loops may be empty; whether any was."""
    from tvm.s_tir.schedule import ScheduleError

    try:
        pending = list(sch.get_child_blocks(sch.get_sblock("root")))
    except ScheduleError:
        return False  # hand-written TIR (e.g. TVM's cumsum), no block tree to walk
    changed = False
    while pending:
        block = pending.pop()
        pending.extend(sch.get_child_blocks(block))
        loop = _first_reduction_loop(sch, block)
        if loop is None:
            continue
        try:
            sch.decompose_reduction(block, loop)
            changed = True
        except ScheduleError:
            pass  # scheduled into a form TVM cannot decompose; left as it is
    return changed


def _first_reduction_loop(sch: Any, block: Any) -> Optional[Any]:
    """The outermost loop bound to a reduction iterator of `block`, when the block still has
    its init and one of its reduction loops may have an extent of 0; else None."""
    from tvm import tirx
    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

    stmt = sch.get(block)
    if stmt.init is None:
        return None
    values = get_sblockrealize(sch, block).iter_values
    reducing = [value for var, value in zip(stmt.iter_vars, values) if var.iter_type == tirx.IterVar.CommReduce]
    loops = [loop for loop in sch.get_loops(block) if any(_uses(v, sch.get(loop).loop_var) for v in reducing)]
    if not loops or all(isinstance(sch.get(loop).extent, tirx.IntImm) and sch.get(loop).extent.value > 0 for loop in loops):
        return None
    return loops[0]


def _uses(expr: Any, var: Any) -> bool:
    """Whether the TIR expression `expr` reads the variable `var`."""
    from tvm import tirx

    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _leave_empty(sch: Any, target: Any) -> Optional[Any]:
    """`sch` unchanged when one of its loops has a static extent of 0, else None."""
    from tvm import tirx
    from tvm.s_tir.schedule import ScheduleError

    try:
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    except ScheduleError:
        return None  # hand-written TIR: no block tree
    loops = [sch.get(loop) for block in blocks for loop in sch.get_loops(block)]
    empty = any(isinstance(loop.extent, tirx.IntImm) and loop.extent.value == 0 for loop in loops)
    return sch if empty else None


def _lanes(target: Any) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // 32, 4)


def _static(sch: Any, loop: Any) -> Optional[int]:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _schedule_matmul(sch: Any, target: Any) -> Optional[Any]:
    from tvm.s_tir import dlight
    from tvm.s_tir.schedule import ScheduleError

    blocks = dlight.normalize_prim_func(sch)
    if blocks is None:
        return None
    transposes = [b for b in blocks if b.is_injective() and _is_transpose(sch, b.block_rv)]
    blocks = dlight.try_inline_contiguous_spatial(sch, [b for b in blocks if b not in transposes])
    if not blocks or blocks[0].is_injective() or any(not b.is_injective() for b in blocks[1:]):
        return None
    for producer in transposes:
        loops = sch.get_loops(producer.block_rv)
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    main = blocks[0]
    kinds = main.dom_kind()
    if not kinds.endswith("SSR") or kinds.count("R") != 1 or len(main.read_bufs(sch)) != 2:
        return None
    block = main.block_rv
    *batch, i, j, k = sch.get_loops(block)
    lanes = _lanes(target)
    n = _static(sch, j)
    nr = lanes if n is not None and n % (NR_VECTORS * lanes) else NR_VECTORS * lanes
    local = sch.cache_write(block, 0, "local")
    pending = []
    for epilogue in blocks[1:]:
        try:
            sch.reverse_compute_inline(epilogue.block_rv)
        except ScheduleError:
            pending.append(epilogue.block_rv)
    io, ii = sch.split(i, [None, MR])
    jo, ji = sch.split(j, [None, nr])
    sch.reorder(*batch, jo, io, k, ii, ji)
    sch.reverse_compute_at(local, io, preserve_unit_loops=True)
    for epilogue in pending:
        sch.reverse_compute_at(epilogue, io, preserve_unit_loops=True)
    sch.parallel(sch.fuse(*batch, jo) if batch else jo)
    sch.unroll(ii)
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, k)
    for tail in [init, local, *pending]:
        sch.vectorize(sch.get_loops(tail)[-1])
    return sch


def _is_transpose(sch: Any, block: Any) -> bool:
    """A copy whose loads index the block's iterators in another order (inlining it into a
    matmul operand would make the vector loads strided, so it is materialized instead)."""
    from tvm import tirx

    stmt = sch.get(block)
    if len(stmt.reads) != 1 or len(stmt.writes) != 1:
        return False
    read = [r.min for r in stmt.reads[0].region]
    written = [r.min for r in stmt.writes[0].region]
    if not all(isinstance(e, tirx.Var) for e in read + written):
        return False
    order = [next((n for n, w in enumerate(written) if w.same_as(r)), -1) for r in read]
    return order != sorted(order)


def _schedule_elementwise(sch: Any, target: Any) -> Optional[Any]:
    from tvm import relax
    from tvm.s_tir import dlight

    if relax.analysis.has_reshape_pattern(sch.mod["main"]):
        return None  # left alone, Relax turns it into a view (no copy)
    blocks = dlight.normalize_prim_func(sch)
    if not blocks or any(not b.is_injective() for b in blocks):
        return None
    blocks = dlight.try_inline(sch, blocks)
    lanes = _lanes(target)
    for info in blocks:
        loops = sch.get_loops(info.block_rv)
        if not loops:
            continue
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        outer, inner = sch.split(fused, [None, lanes * 4])
        sch.parallel(outer)
        _, vector = sch.split(inner, [None, lanes])
        sch.vectorize(vector)
    return sch
