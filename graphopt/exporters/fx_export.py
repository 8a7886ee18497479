"""IR -> torch.fx: `to_fx(graph)` builds a runnable `torch.fx.GraphModule`.

Each IR node becomes one call to the torch implementation of its op's semantics (see
`graphopt.exporters.torch_kernels`); constants become buffers of the module (shared with
the IR where the data is already writable memory), or trainable parameters for the constants
named in `trainable`. The module's `forward` takes the graph
inputs positionally, in order, and returns a tuple of the graph outputs. An op without a
torch implementation raises `UnsupportedOpError` naming the node and the op. Matmuls by the
transpose of a weight graph input (the backend's autograd path) become `F.linear` calls with
their bias (`fx_linear_calls`).
"""

from __future__ import annotations

import keyword
import operator
import re
from typing import Any, Collection

import numpy as np

from graphopt.errors import ExportError, UnsupportedOpError
from graphopt.exporters import torch_kernels
from graphopt.ir.dtypes import DType
from graphopt.ir.graph import Graph, Node
from graphopt.ir.torch_arrays import to_torch
from graphopt.ir.tensor import ArrayTensor, ConstTensor


def to_fx(graph: Graph, *, prepack_linears: bool = False, trainable: Collection[str] = ()) -> Any:
    """Lower `graph` to a `torch.fx.GraphModule` that computes the same outputs.

    `prepack_linears` (CPU only): matmuls with constant float32 or bfloat16 weights run as oneDNN linears
    over weights packed once here, with bias and GELU epilogues folded in (see `fx_linear`);
    bfloat16 matmuls on a CPU that would emulate them log a warning. Static-quantized matmuls
    (uint8 activation, int8 weight through DequantizeLinear) and dynamic int8 ones
    (DynamicQuantizeLinear -> MatMulInteger chains) run as oneDNN int8 linears where torch has
    them (see `fx_qlinear`).
    `trainable`: names of float graph constants that become `torch.nn.Parameter`s (copies, so
    training leaves the graph's arrays alone) instead of buffers; `module.graphopt_parameters`
    maps each name to its attribute (used by `graphopt.recover`).
    """
    _check_supported(graph)
    _check_trainable(graph, trainable, prepack_linears)
    return _build(graph, prepack_linears, trainable)


def _build(graph: Graph, prepack_linears: bool, trainable: Collection[str]) -> Any:
    """The GraphModule of `graph`, which `to_fx` has checked."""
    import torch
    import torch.fx

    from graphopt.exporters import fx_linear, fx_linear_calls, fx_qlinear

    plans: dict[int, fx_linear.LinearPlan] = {}
    qplans: dict[int, fx_qlinear.QLinearPlan] = {}
    quantizers: dict[int, fx_qlinear.QuantizePlan] = {}
    dynamic_quantizers: set[int] = set()
    if prepack_linears:
        fx_linear.warn_if_bf16_emulated(graph)
        plans = fx_linear.plan_linears(graph, fx_linear.prepacked_dtypes())
        if fx_qlinear.qlinear_available():
            qplans = fx_qlinear.plan_qlinears(graph)
            if fx_qlinear.fast_quantize_available():
                quantizers = fx_qlinear.plan_quantizers(graph, qplans)
                dynamic_quantizers = fx_qlinear.plan_dynamic_quantizers(graph, qplans)
    calls = fx_linear_calls.plan_linear_calls(graph)
    residual_norms = {id(plan.norm) for plan in qplans.values() if plan.norm is not None}
    absorbed = {id(n) for plan in plans.values() for n in plan.absorbed[1:]}
    absorbed.update(id(n) for plan in qplans.values() for n in plan.skipped)
    absorbed.update(id(n) for plan in quantizers.values() for n in plan.absorbed[:-1])
    absorbed.update(id(n) for call in calls.values() for n in call.absorbed if n.op_type != "MatMul")
    root = torch.nn.Module()
    fx_graph = torch.fx.Graph()
    env: dict[int, torch.fx.Node] = {}
    for value in graph.inputs:
        env[id(value)] = fx_graph.placeholder(_identifier(value.name))
    buffers = _BufferNamer(root)
    read = _constants_read(graph, {**plans, **qplans, **quantizers}, absorbed)
    read.update(id(call.bias) for call in calls.values() if call.bias is not None)
    for value in graph.constants.values():
        if id(value) in read:
            env[id(value)] = fx_graph.get_attr(buffers.add(value.name, value.const, trainable=value.name in trainable))  # type: ignore[arg-type]
    for node in graph.nodes:
        if id(node) in plans:
            _emit_linear(node, plans[id(node)], fx_graph, env, buffers)
        elif id(node) in qplans:
            _emit_qlinear(node, qplans[id(node)], fx_graph, env, buffers)
        elif id(node) in quantizers:
            _emit_quantize(node, quantizers[id(node)], fx_graph, env, buffers)
        elif id(node) in residual_norms:
            _emit_residual_norm(node, fx_graph, env)
        elif id(node) in dynamic_quantizers:
            call = fx_graph.call_function(fx_qlinear.dynamic_quantize_uint8, (env[id(node.inputs[0])],))
            for index, out in enumerate(node.outputs):
                env[id(out)] = fx_graph.call_function(operator.getitem, (call, index))
        elif id(node) in calls:
            call = calls[id(node)]
            args = (env[id(call.x)], env[id(call.weight)], None if call.bias is None else env[id(call.bias)])
            env[id(call.last.output)] = fx_graph.call_function(torch.nn.functional.linear, args)
        elif id(node) not in absorbed:
            _emit(node, graph, fx_graph, env, buffers)
    outputs = tuple(env[id(v)] for v in graph.outputs)
    fx_graph.output(outputs)
    module = torch.fx.GraphModule(root, fx_graph, class_name=_identifier(graph.name) or "GraphModule")
    module.graphopt_parameters = dict(buffers.parameters)
    module.eval()
    return module


def _check_supported(graph: Graph) -> None:
    """Refuse, before building anything, a graph with a node torch cannot run: an op without
    a kernel, an element type the kernel cannot run (`torch_kernels.PARTIAL_DTYPE_KERNELS`)
    or an attribute value it does not implement."""
    missing = [n for n in graph.nodes if torch_kernels.get_kernel(n.domain, n.op_type) is None]
    if missing:
        ops = sorted({n.qualified_op for n in missing})
        first = missing[0]
        raise UnsupportedOpError(
            f"to_fx: no torch implementation for op(s) {', '.join(ops)} "
            f"(first at node {first.label}); these ops can only run in a target that provides them"
        )
    for node in graph.nodes:
        problem = _node_problem(node)
        if problem:
            raise UnsupportedOpError(
                f"to_fx: node {node.label}: {problem}; run it in a target that supports it (e.g. onnxruntime)"
            )


def _node_problem(node: Node) -> str | None:
    dtypes = [v.dtype for v in (*node.inputs, *node.outputs) if v is not None and v.dtype is not None]
    unsupported = torch_kernels.unsupported_dtype(node.domain, node.op_type, dtypes)
    if unsupported is not None:
        return f"torch has no CPU kernel computing {node.qualified_op} on element type {DType(unsupported).name.lower()}"
    attribute = torch_kernels.unsupported_attribute(node.domain, node.op_type, node.attrs)
    return None if attribute is None else f"the torch kernel of {node.qualified_op} does not implement {attribute}"


def _constants_read(graph: Graph, plans: dict[int, Any], absorbed: set[int]) -> set[int]:
    """Ids of the constants the module reads: not those only a prepacked linear folds in
    (its weight and bias are packed copies), so they are not converted for nothing."""
    read = {id(v) for v in graph.outputs}
    for node in graph.nodes:
        if id(node) not in absorbed:
            read.update(id(v) for v in (node.inputs[:1] if id(node) in plans else node.inputs) if v is not None)
    return read


def _check_trainable(graph: Graph, trainable: Collection[str], prepack_linears: bool) -> None:
    if not trainable:
        return
    if prepack_linears:
        raise ExportError("to_fx: trainable constants need prepack_linears=False (packed weights are not parameters)")
    constants = graph.constants
    wrong = sorted(n for n in trainable if n not in constants or constants[n].dtype is None or not constants[n].dtype.is_float)
    if wrong:
        raise ExportError(f"to_fx: trainable names must be float constants of graph '{graph.name}': {', '.join(wrong)}")


def _emit(node: Node, graph: Graph, fx_graph: Any, env: dict[int, Any], buffers: "_BufferNamer") -> None:
    if node.op_type == "Constant" and node.domain == "" and isinstance(node.attrs.get("value"), ConstTensor):
        env[id(node.output)] = fx_graph.get_attr(buffers.add(node.output.name, node.attrs["value"]))
        return
    kernel = torch_kernels.get_kernel(node.domain, node.op_type)
    args = tuple(None if v is None else env[id(v)] for v in node.inputs)
    kwargs: dict[str, Any] = {}
    for name, attr in node.attrs.items():
        if isinstance(attr, ConstTensor):
            kwargs[name] = fx_graph.get_attr(buffers.add(f"{node.name}_{name}", attr))
        elif isinstance(attr, tuple):
            kwargs[name] = list(attr)
        else:
            kwargs[name] = attr
    if node.op_type in torch_kernels.OPSET_SENSITIVE_OPS and node.domain == "":
        kwargs["opset"] = graph.opset("")
    if node.op_type == "Dropout" and node.domain == "" and len(node.outputs) < 2:
        kwargs["mask"] = False
    if node.op_type == "Split" and node.domain == "" and "split" not in kwargs and "num_outputs" not in kwargs and (len(args) < 2 or args[1] is None):
        kwargs["num_outputs"] = len(node.outputs)
    call = fx_graph.call_function(kernel, args, kwargs)
    if node.op_type in torch_kernels.MULTI_OUTPUT_OPS or (node.domain, node.op_type) in torch_kernels.MULTI_OUTPUT_KERNELS:
        for index, out in enumerate(node.outputs):
            env[id(out)] = fx_graph.call_function(operator.getitem, (call, index))
    else:
        env[id(node.output)] = call


def _emit_linear(node: Node, plan: Any, fx_graph: Any, env: dict[int, Any], buffers: "_BufferNamer") -> None:
    from graphopt.exporters import fx_linear

    weight = fx_graph.get_attr(buffers.add_tensor(f"{node.name}_packed_weight", fx_linear.pack_weight(plan.weight)))
    bias = None
    if plan.bias is not None:
        bias = fx_graph.get_attr(buffers.add(f"{node.name}_bias", ArrayTensor(plan.bias)))
    call = fx_graph.call_function(fx_linear.packed_linear, (env[id(node.inputs[0])], weight, bias), {"gelu": plan.gelu})
    env[id(plan.last.output)] = call


def _emit_qlinear(node: Node, plan: Any, fx_graph: Any, env: dict[int, Any], buffers: "_BufferNamer") -> None:
    import torch

    from graphopt.exporters import fx_qlinear

    def buffer(suffix: str, tensor: Any) -> Any:
        return fx_graph.get_attr(buffers.add_tensor(f"{node.name}_{suffix}", tensor))

    weight = buffer("packed_weight", fx_qlinear.pack_weight(plan.weight))
    scale = buffer("weight_scale", torch.tensor(plan.weight_scale))
    zero = buffer("weight_zero_point", torch.zeros(plan.weight.shape[0], dtype=torch.int64))
    bias = None if plan.bias is None else buffer("bias", torch.tensor(plan.bias))
    x_scale, x_zero = plan.activation_scale, plan.activation_zero
    if not isinstance(x_scale, float):
        x_scale, x_zero = env[id(x_scale)], env[id(x_zero)]
    residual = None if plan.residual is None else fx_graph.call_method("contiguous", (env[id(plan.residual)],))
    op, args = fx_qlinear.qlinear_call(plan, env[id(plan.activation)], x_scale, x_zero, weight, scale, zero, bias, residual)
    env[id(plan.last.output)] = fx_graph.call_function(op, args)


def _emit_residual_norm(node: Node, fx_graph: Any, env: dict[int, Any]) -> None:
    """A SkipLayerNorm whose residual add (and bias) an int8 linear did: its x input stands for the sum."""
    from graphopt.exporters import graphopt_kernels

    args = (env[id(node.inputs[0])], *(None if v is None else env[id(v)] for v in node.inputs[2:4]))
    kwargs = {name: node.attrs[name] for name in ("epsilon", "simplified") if name in node.attrs}
    call = fx_graph.call_function(graphopt_kernels.skip_layer_norm_of_sum, args, kwargs)
    for index, out in enumerate(node.outputs):
        env[id(out)] = fx_graph.call_function(operator.getitem, (call, index))


def _emit_quantize(node: Node, plan: Any, fx_graph: Any, env: dict[int, Any], buffers: "_BufferNamer") -> None:
    from graphopt.exporters import fx_qlinear

    multiplier = None
    if plan.multiplier is not None:
        multiplier = fx_graph.get_attr(buffers.add(f"{node.name}_multiplier", ArrayTensor(plan.multiplier)))
    args = (env[id(plan.source)], plan.scale, plan.zero, multiplier)
    env[id(node.output)] = fx_graph.call_function(fx_qlinear.quantize_uint8, args)


class _BufferNamer:
    """Registers constants as module buffers under unique attribute names."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.taken: set[str] = set()
        self.parameters: dict[str, str] = {}
        """Constant name -> attribute of the trainable ones."""

    def add(self, name: str, tensor: ConstTensor, *, trainable: bool = False) -> str:
        if not trainable:
            return self.add_tensor(name, _to_torch(tensor))
        import torch

        attr = self._free(name)
        self.root.register_parameter(attr, torch.nn.Parameter(_to_torch(tensor).clone()))
        self.parameters[name] = attr
        return attr

    def add_tensor(self, name: str, tensor: Any) -> str:
        """Register a torch tensor as it is."""
        attr = self._free(name)
        self.root.register_buffer(attr, tensor)
        return attr

    def _free(self, name: str) -> str:
        """A unique attribute name derived from `name`, now taken (never one of the module's
        own attributes, such as `to` or `forward`)."""
        base = _identifier(name) or "const"
        attr = base
        suffix = 0
        while attr in self.taken or hasattr(self.root, attr):
            suffix += 1
            attr = f"{base}_{suffix}"
        self.taken.add(attr)
        return attr


def _to_torch(tensor: ConstTensor) -> Any:
    array = tensor.numpy()
    if array.dtype.kind == "V" and torch_kernels.torch_dtype(tensor.dtype) is None:
        raise UnsupportedOpError(f"to_fx: torch has no element type {tensor.dtype.name.lower()} for a constant")
    if not array.flags.writeable:
        array = np.array(array, copy=True, order="C")
    return to_torch(array)



def _identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    if ident and ident[0].isdigit():
        ident = "v_" + ident
    if keyword.iskeyword(ident):
        ident += "_"
    return ident

