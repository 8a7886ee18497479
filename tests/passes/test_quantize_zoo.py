"""Every quantization pass on every zoo architecture after `fuse`: verifies, runs in ONNX Runtime
and the torch target with the same results, and stays close to the float model."""

import numpy as np
import pytest
from conftest import ROUNDTRIP_ARCHITECTURES, numpy_inputs
from quant_testing import cosine

import graphopt
from graphopt.check import run_graph

PIPELINES = {
    "fuse,quantize": 0.999,
    "fuse,smooth-quant{alpha=per-layer},quantize": 0.999,
    "fuse,quantize{mode=dynamic}": 0.999,
    "fuse,quantize{mode=weight-only,dtype=int4,block_size=16,accuracy_level=0}": 0.98,
    "fuse,to-fp16": 0.9999,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ROUNDTRIP_ARCHITECTURES)
def test_every_quantization_pipeline_runs_on_the_zoo(name, zoo, zoo_onnx):
    graph = graphopt.from_onnx(zoo_onnx(name))
    feeds = numpy_inputs(zoo(name))
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(2)]
    expected = run_graph(graph, feeds)[0]
    for pipeline, min_cosine in PIPELINES.items():
        out = graphopt.optimize(graph.clone(), pipeline, calibration_data=samples, verify=True)
        in_ort = run_graph(out, feeds)[0]
        assert cosine(expected, in_ort) >= min_cosine, pipeline
        np.testing.assert_allclose(run_graph(out, feeds, engine="torch")[0], in_ort, atol=2e-2, err_msg=pipeline)
