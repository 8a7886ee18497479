"""drop-padding: attended positions keep their values, padded ones come out as zeros, and graphs
whose padding reaches attended positions (or that have no trimmable sequence axis) are refused."""

import numpy as np
import pytest
from conftest import numpy_inputs

import graphopt
from graphopt import DType, Graph, TensorType
from graphopt.check import run_graph
from graphopt.errors import GraphoptError

LENGTHS = (6, 4)
"""Attended positions of the two rows of the zoo's batch (seq 8)."""


def _right_padded(feeds: dict[str, np.ndarray], lengths=LENGTHS) -> dict[str, np.ndarray]:
    feeds = dict(feeds)
    mask = np.zeros_like(feeds["attention_mask"])
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    feeds["attention_mask"] = mask
    return feeds


def _compare(before: list, after: list, mask: np.ndarray) -> None:
    attended = mask.astype(bool)
    for want, got in zip(before, after):
        assert got.shape == want.shape
        np.testing.assert_allclose(got[attended], want[attended], rtol=1e-5, atol=1e-5)
        assert not np.any(got[~attended])


@pytest.mark.parametrize("name", ["bert", "distilbert", "deberta-v2", "t5-encoder", "llama"])
def test_attended_positions_keep_their_values_and_padding_outputs_zeros(name, zoo, zoo_onnx):
    graph = graphopt.optimize(graphopt.from_onnx(zoo_onnx(name)), "fuse")
    feeds = _right_padded(numpy_inputs(zoo(name)))
    trimmed = graphopt.optimize(graph, "drop-padding")
    sliced = [n for n in trimmed if n.op_type == "Slice" and n.name.startswith("drop_padding")]
    assert len(sliced) == sum(1 for v in graph.inputs if v.shape[1] == "seq") + 1  # each sequence input, and the mask's flags
    assert [v.name for v in trimmed.outputs] == [v.name for v in graph.outputs]
    _compare(run_graph(graph, feeds), run_graph(trimmed, feeds), feeds["attention_mask"])
    assert trimmed.outputs[0].shape[1] == "seq"
    assert trimmed.outputs[0].producer.op_type == "Pad"


def test_the_computed_prefix_is_the_longest_row_and_left_padding_runs_whole(zoo, zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    trimmed = graphopt.optimize(graph, "drop-padding")
    kept = next(n for n in trimmed if n.name.startswith("drop_padding_Max")).output
    trimmed.set_outputs([*trimmed.outputs, kept])
    base = numpy_inputs(zoo("bert"))
    for lengths, expected in (((6, 4), 6), ((1, 2), 2), ((0, 0), 1), ((8, 3), 8)):
        feeds = _right_padded(base, lengths)
        *outputs, prefix = run_graph(trimmed, feeds)
        assert prefix.tolist() == [expected]
        _compare(run_graph(graph, feeds), outputs, feeds["attention_mask"])
    left = dict(base, attention_mask=np.array([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]], np.int64))
    *outputs, prefix = run_graph(trimmed, left)
    assert prefix.tolist() == [8]
    _compare(run_graph(graph, left), outputs, left["attention_mask"])


@pytest.mark.parametrize("target", ["onnxruntime:cpu", "torch"])
def test_quantized_graph_on_each_target_runs_the_prefix(target, zoo, zoo_onnx):
    feeds = _right_padded(numpy_inputs(zoo("bert")))
    path = str(zoo_onnx("bert"))
    static = "quantize{mode=static,smooth=false}"
    full = graphopt.compile(path, target=target, pipeline=f"fuse,{static}", calibration_data=[feeds])
    trimmed = graphopt.compile(path, target=target, pipeline=f"fuse,drop-padding,{static}", calibration_data=[feeds])
    want, got = np.asarray(full(**feeds)[0]), np.asarray(trimmed(**feeds)[0])
    attended = feeds["attention_mask"].astype(bool)
    assert got.shape == want.shape and not np.any(got[~attended])
    cosine = float(np.sum(want[attended] * got[attended]) / (np.linalg.norm(want[attended]) * np.linalg.norm(got[attended])))
    assert cosine > 0.999  # calibration saw the attended rows only: scales differ a little


def test_a_second_run_changes_nothing(zoo_onnx):
    graph = graphopt.optimize(graphopt.from_onnx(zoo_onnx("bert")), "drop-padding")
    nodes = len(graph.nodes)
    again = graphopt.optimize(graph, "drop-padding")
    assert len(again.nodes) == nodes


def _position_mixing_graph() -> Graph:
    """An encoder-shaped graph whose output at every position reads the mean over all positions."""
    graph = Graph("mixing", {"": 17})
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", "seq", 4)))
    graph.add_input("attention_mask", TensorType(DType.INT64, ("batch", "seq")))
    mean = graph.add_node("ReduceMean", [x], {"axes": [1], "keepdims": 1}).output
    graph.set_outputs([graph.add_node("Add", [x, mean], output_names=["y"]).output])
    return graph


def test_a_graph_mixing_padded_positions_is_refused_unchanged():
    graph = _position_mixing_graph()
    before = graph.to_onnx().SerializeToString()
    with pytest.raises(GraphoptError, match=r"output 'y' changes at attended positions .* mixes positions outside masked attention"):
        graphopt.optimize(graph, "drop-padding")
    assert graph.to_onnx().SerializeToString() == before


def test_refusals_name_the_input_or_output_in_the_way(zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx("bert"))
    with pytest.raises(GraphoptError, match=r"no input 'mask'.*its inputs: input_ids, attention_mask, token_type_ids.*mask=<input>"):
        graphopt.optimize(graph, "drop-padding{mask=mask}")
    static = Graph("static", {"": 17})
    static.add_input("attention_mask", TensorType(DType.INT64, ("batch", 8)))
    static.set_outputs([static.add_node("Identity", [static.inputs[0]]).output])
    with pytest.raises(GraphoptError, match=r"input 'attention_mask' has shape \[batch, 8\]; it needs \[batch, seq\]"):
        graphopt.optimize(static, "drop-padding")
    transposed = Graph("transposed", {"": 17})
    x = transposed.add_input("x", TensorType(DType.FLOAT, ("batch", 4, "seq")))
    transposed.add_input("attention_mask", TensorType(DType.INT64, ("batch", "seq")))
    transposed.set_outputs([transposed.add_node("Relu", [x], output_names=["y"]).output])
    with pytest.raises(GraphoptError, match=r"input 'x' has shape \[batch, 4, seq\]; the sequence length 'seq' may only be its axis 1"):
        graphopt.optimize(transposed, "drop-padding")


def test_a_kv_cache_decoder_is_refused():
    import decoder_zoo

    graph = graphopt.from_onnx(decoder_zoo.decoder_onnx("llama", "torchscript", "eager"))
    shapes = {v.name: v.shape for v in graph.inputs}
    with pytest.raises(GraphoptError, match=rf"input 'input_ids' has length '{shapes['input_ids'][1]}' at axis 1 where 'attention_mask' has "
                                            rf"'{shapes['attention_mask'][1]}': another length \(a KV-cache decoder's"):
        graphopt.optimize(graph, "drop-padding")
