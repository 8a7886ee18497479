"""What a target is: `TargetSpec` (text such as ``tvm:llvm{mcpu=znver4}``), `Target`, `CompiledModel`.

A target turns an IR graph into something runnable and saveable. Subclasses of `Target`
declare a `name`, the `variants` they accept (the first is the default), typed option
fields (a dataclass, like passes) and implement:

- `available()`: None when the target can run here, else a sentence saying what is missing
  (e.g. "the tensorrt package is not installed");
- `unsupported_nodes(graph)`: the nodes it cannot run (a caller names them in its error),
  and `unsupported_reason(nodes)`: why, naming what they lack (an element type, say) and
  what to do instead;
- `lowering() -> [Pass]`: the passes that rewrite a graph into the ops it runs (a pipeline
  `graphopt.compile` runs after the user's, under the same instruments);
- `compile(graph) -> CompiledModel` (lowering the graph first with `lower`);
- `load(directory, manifest) -> CompiledModel` for artifacts `CompiledModel.save` wrote.

`CompiledModel` subclasses implement `_run(feeds)` on numpy arrays (or override `_call`
to keep torch tensors on their device) and `_save_files(directory) -> [file names]`.
Calling a compiled model takes numpy arrays or torch tensors, positionally in input order
or by input name, and returns a list of outputs of the same kind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.options import Spec
from graphopt.pass_base import configure, field_default
from graphopt.ir.torch_arrays import is_torch, to_numpy, to_torch
from graphopt.ir.types import format_shape

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class TargetError(GraphoptError):
    """A target spec, option or artifact is invalid, or the target cannot run a graph here."""


class TargetSpec(Spec):
    """A parsed target spec ``name[:variant][{option=value,...}]``: name, variant, options."""

    what = "target spec"
    example = "'tvm:llvm{mcpu=znver4}'"
    error = TargetError


@dataclasses.dataclass
class Target:
    """Base class of targets; subclasses are dataclasses whose fields are options."""

    name: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    variant: str = ""

    @classmethod
    def from_spec(cls, spec: TargetSpec) -> "Target":
        """Instantiate with the spec's variant (default: the first) and options, validated."""
        variant = spec.variant or (cls.variants[0] if cls.variants else "")
        if cls.variants and variant not in cls.variants:
            raise TargetError(f"target '{cls.name}' has no variant '{variant}'; use one of {', '.join(cls.variants)}")
        return configure(cls, spec.options, f"target '{cls.name}'", TargetError, variant=variant)

    @property
    def spec(self) -> TargetSpec:
        options = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "variant" and getattr(self, f.name) != field_default(f)
        }
        return TargetSpec(self.name, self.variant or None, options)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def available(self) -> Optional[str]:
        """None if this target can compile and run here; else what is missing."""
        return None

    def unsupported_nodes(self, graph: Any) -> list[Any]:
        """Nodes of `graph` this target cannot run."""
        return []

    def unsupported_reason(self, nodes: Sequence[Any]) -> str:
        """Why this target cannot run `nodes` (ones `unsupported_nodes` named) and what to do
        instead, one sentence that `check_supported` adds to its error; "" where naming the
        ops says it all."""
        return ""

    def lowering(self) -> list[Any]:
        """The passes that put a graph into the ops this target runs, in order (none by
        default). `graphopt.compile` runs them after the pipeline, through the same pass
        manager (so `--dump-ir`, `--check` and the report show them); `compile` runs them
        again on a copy (`lower`), for callers that did not, so they must leave a lowered
        graph unchanged. Steps that change the model's interface (TensorRT's int32 engine
        I/O) are build steps of `compile`, not lowering passes."""
        return []

    def lower(self, graph: Any) -> Any:
        """A copy of `graph` after the `lowering` passes (`graph` itself when there are none)."""
        passes = self.lowering()
        if not passes:
            return graph
        from graphopt.pass_manager import PassManager

        lowered = graph.clone()
        PassManager(passes).run(lowered)
        return lowered

    def compile(self, graph: Any) -> "CompiledModel":
        raise NotImplementedError(f"target '{self.name}' does not implement compile()")

    def load(self, directory: str, manifest: dict[str, Any]) -> "CompiledModel":
        raise NotImplementedError(f"target '{self.name}' cannot load saved artifacts")


@dataclasses.dataclass(frozen=True)
class IOSpec:
    """A model input or output: name, numpy dtype name, shape (ints, symbol names or None)."""

    name: str
    dtype: Optional[str]
    shape: Optional[tuple[Any, ...]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "IOSpec":
        shape = data.get("shape")
        return cls(data["name"], data.get("dtype"), None if shape is None else tuple(shape))

    @classmethod
    def of(cls, value: Any) -> "IOSpec":
        """From an IR Value."""
        dtype = value.dtype.to_numpy().name if value.dtype is not None else None
        return cls(value.name, dtype, value.shape)


class CompiledModel:
    """A graph compiled for a target: call it, save it, load it back with `load_compiled`."""

    def __init__(self, target: Target, inputs: Sequence[IOSpec], outputs: Sequence[IOSpec]) -> None:
        self.target = target
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.pipeline_report: Any = None

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def __repr__(self) -> str:
        return f"<CompiledModel target={self.target.spec} inputs={self.input_names} outputs={self.output_names}>"

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        feeds = self.bind(args, kwargs)
        return self._call(feeds)

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """{input name: tensor} from positional and keyword arguments; TargetError if wrong."""
        names = self.input_names
        if len(args) > len(names):
            raise TargetError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(args)} positional")
        feeds = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                raise TargetError(f"the model has no input {key!r}; inputs: {', '.join(names)}")
            if key in feeds:
                raise TargetError(f"input {key!r} given both positionally and by name")
            feeds[key] = value
        missing = [n for n in names if n not in feeds]
        if missing:
            raise TargetError(f"missing input(s): {', '.join(missing)} (the model takes {', '.join(names)})")
        for spec in self.inputs:
            _check_input(spec, feeds[spec.name])
        return feeds

    def _call(self, feeds: dict[str, Any]) -> list[Any]:
        """Run on numpy (torch tensors are converted and the outputs converted back)."""
        torch_like = next((v for v in feeds.values() if is_torch(v)), None)
        outputs = self._run({k: to_numpy(v) for k, v in feeds.items()})
        if torch_like is None:
            return outputs
        return [to_torch(o, torch_like.device) for o in outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _save_files(self, directory: str) -> list[str]:
        """Write the artifact's files into `directory`; return their names."""
        raise NotImplementedError(f"target '{self.target.name}' cannot save compiled models")

    def _manifest_extra(self) -> dict[str, Any]:
        """Target-specific manifest entries."""
        return {}

    def in_place_kv_cache_unavailable(self) -> Optional[str]:
        """Why this model cannot decode with its KV cache kept in place (`graphopt.generate`'s
        `kv_cache="in_place"`); None where it can (`in_place_kv_cache` then gives the session)."""
        return f"the in-place KV cache needs the onnxruntime target, not {self.target.spec}"

    def in_place_kv_cache(self, *, batch: int, capacity: int) -> Any:
        """A session with `prefill(feeds)` and `step(feeds)` -> logits over a KV cache of
        `capacity` positions for `batch` sequences, kept in place between steps."""
        raise TargetError(f"no in-place KV cache: {self.in_place_kv_cache_unavailable()}")

    def build_notes(self) -> list[str]:
        """Lines on what the build did beyond compiling (e.g. TVM's tuning), printed by
        `graphopt compile`; none by default."""
        return []

    def save(self, directory: "str | os.PathLike[str]") -> str:
        """Write the artifact and a manifest.json into `directory`, atomically; return its path.

        An existing folder is replaced only if it holds a graphopt artifact (a manifest);
        any other non-empty folder is refused.
        """
        from graphopt import __version__
        from graphopt.exporters.files import folder_mode

        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory):
            if not os.path.isdir(directory):
                raise TargetError(f"{directory}: exists and is not a folder")
            if os.listdir(directory) and not os.path.isfile(os.path.join(directory, MANIFEST)):
                raise TargetError(f"{directory}: folder is not empty and holds no graphopt artifact; choose another")
        parent = os.path.dirname(directory)
        if not os.path.isdir(parent):
            raise TargetError(f"{directory}: the folder {parent} does not exist")
        staging = tempfile.mkdtemp(prefix=".graphopt-", dir=parent)
        try:
            os.chmod(staging, folder_mode())
            files = self._save_files(staging)
            manifest = {
                "format": MANIFEST_FORMAT,
                "graphopt_version": __version__,
                "target": self.target.name,
                "spec": str(self.target.spec),
                "inputs": [spec.to_json() for spec in self.inputs],
                "outputs": [spec.to_json() for spec in self.outputs],
                "files": sorted(files),
                **self._manifest_extra(),
            }
            with open(os.path.join(staging, MANIFEST), "w") as handle:
                json.dump(manifest, handle, indent=2, sort_keys=True)
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix=".graphopt-old-", dir=parent)
                os.rename(directory, os.path.join(old, "artifact"))
                os.rename(staging, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory



def _check_input(spec: IOSpec, value: Any) -> None:
    if spec.shape is None and spec.dtype is None:
        return  # a sequence, an optional, or a tensor of unknown type: the runtime checks it
    if isinstance(value, np.ndarray) and _fits(spec, value):
        return  # the common case, without formatting anything (this runs on every call)
    if isinstance(value, (list, tuple)) or value is None:
        raise TargetError(f"input {spec.name!r} is a tensor: pass an array, not {type(value).__name__}")
    shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
    if spec.shape is not None:
        if len(shape) != len(spec.shape):
            raise TargetError(f"input {spec.name!r}: expected rank {len(spec.shape)} {format_shape(spec.shape)}, got shape {tuple(shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, shape)):
            if isinstance(want, int) and want != got:
                raise TargetError(f"input {spec.name!r}: dim {axis} must be {want} {format_shape(spec.shape)}, got shape {tuple(shape)}")
    if spec.dtype is not None:
        got_dtype = str(value.dtype).replace("torch.", "") if hasattr(value, "dtype") else np.asarray(value).dtype.name
        if got_dtype != spec.dtype:
            raise TargetError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {got_dtype}")


def _fits(spec: IOSpec, value: np.ndarray) -> bool:
    if spec.dtype is not None and value.dtype != _numpy_dtype(spec.dtype):
        return False
    if spec.shape is None:
        return True
    return value.ndim == len(spec.shape) and all(not isinstance(want, int) or want == got for want, got in zip(spec.shape, value.shape))


@functools.lru_cache(maxsize=None)
def _numpy_dtype(name: str) -> Optional[np.dtype]:
    try:
        return np.dtype(name)
    except TypeError:
        return None  # an ml_dtypes name numpy does not know by itself: the full check compares names

