"""Weights are not copied on import, and models past protobuf's 2 GB limit load and save.

Memory is measured in a fresh subprocess (growth of the peak resident set, VmHWM, which
unlike ru_maxrss is not inherited across exec) so the test process does not pollute it.
"""

import json
import subprocess
import sys
import textwrap

import pytest

WEIGHT_MB = 100

_MEASURE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnx
    import graphopt
    def peak_mb():
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    path, mode = sys.argv[1], sys.argv[2]
    before = peak_mb()
    if mode == "graphopt":
        graph = graphopt.from_onnx(path)
        graph.verify()
        text = str(graph)
        checksum = float(sum(v.const.numpy()[:1, :4].sum() for v in graph.constants.values()))
    else:
        model = onnx.load(path)
        checksum = 0.0
    print(json.dumps({"growth_mb": peak_mb() - before, "checksum": checksum}))
    """
)


def _make_model(path, external: bool, tensors: int = 4, mb_each: float = WEIGHT_MB / 4):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rows = int(mb_each * 1024 * 1024 / 4 / 1024)
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for i in range(tensors):
        inits.append(numpy_helper.from_array(rng.random((rows, 1024), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("ReduceSum", [f"w{i}"], [f"s{i}"], keepdims=0))
    nodes.append(helper.make_node("Sum", [f"s{i}" for i in range(tensors)], ["y"]))
    graph = helper.make_graph(nodes, "big", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], inits)
    import onnx

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)
    return path


def _measure(path, mode):
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_import_does_not_copy_weights(tmp_path, external):
    path = _make_model(tmp_path / "big.onnx", external)
    ours = _measure(path, "graphopt")
    print(f"from_onnx peak growth for {WEIGHT_MB} MB of weights ({'external' if external else 'inline'}): {ours['growth_mb']:.1f} MB")
    assert ours["growth_mb"] < 0.5 * WEIGHT_MB
    if not external:
        reference = _measure(path, "onnx.load")
        print(f"onnx.load peak growth: {reference['growth_mb']:.1f} MB")
        assert reference["growth_mb"] > ours["growth_mb"]


def test_weights_read_lazily_match_the_file(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import graphopt

    path = _make_model(tmp_path / "m.onnx", external=False, tensors=2, mb_each=1)
    graph = graphopt.from_onnx(path)
    for init in onnx.load(str(path)).graph.initializer:
        np.testing.assert_array_equal(graph.constants[init.name].const.numpy(), numpy_helper.to_array(init))


@pytest.mark.slow
def test_model_over_2gb_loads_and_saves(tmp_path):
    """A 2.1 GB model (sparse external-data file, so the test is cheap on disk) loads
    without reading its weights and saves back through external data."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    import graphopt

    rows = cols = 12288
    count = 4
    inits = []
    for i in range(count):
        tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, cols])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "huge.data"), ("offset", str(i * rows * cols * 4)), ("length", str(rows * cols * 4))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"])] + [
        helper.make_node("MatMul", [f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(1, count)
    ]
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cols])],
                              [helper.make_tensor_value_info(f"h{count - 1}", TensorProto.FLOAT, ["n", cols])], inits)
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with open(tmp_path / "huge.data", "wb") as handle:
        handle.truncate(count * rows * cols * 4)
    loaded = graphopt.from_onnx(path)
    total = sum(v.const.nbytes for v in loaded.constants.values())
    assert total > 2**31
    loaded.verify()
    assert loaded.outputs[0].shape == ("n", cols)
    out = tmp_path / "copy.onnx"
    loaded.save_onnx(out)
    assert (tmp_path / "copy.onnx.data").stat().st_size >= total
    again = graphopt.from_onnx(out)
    assert np.count_nonzero(again.constants["w3"].const.numpy()[-2:]) == 0
    with pytest.raises(graphopt.ExportError, match="weights are read from this file"):
        again.save_onnx(out)
