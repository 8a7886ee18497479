"""Run the benchmarks the README quotes and regenerate its performance section.

    python benchmarks/run_all.py                 # every benchmark, then the README section
    python benchmarks/run_all.py --only onnxruntime_cpu,torch_compile_cpu
    python benchmarks/run_all.py --readme-only   # rebuild the README section from saved results

Each benchmark script prints markdown; its output is saved to `benchmarks/results/<name>.md`
under a header naming the date, the machine and the library versions. The README's text
between `<!-- performance:start -->` and `<!-- performance:end -->` is then rebuilt from those
files, so every figure the README quotes comes from a saved run of a script in this folder.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
TIMEOUT_S = 3600

BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "targets_cpu": ("every target vs ONNX Runtime and torch.compile (CPU)", []),
    "onnxruntime_cpu": ("graphopt `fuse` in ONNX Runtime vs ORT's own optimizer (CPU)", []),
    "quantization_cpu": ("int8: graphopt `quantize` vs ORT `quantize_dynamic` (CPU)", []),
    "torch_compile_cpu": ("torch.compile backends, inference and training (CPU)", ["--warmup", "3", "--repeats", "10", "--train-repeats", "8"]),
    "compression_minilm": ("structured compression on the real all-MiniLM-L6-v2 (CPU)", []),
    "tvm_cpu": ("TVM target vs ONNX Runtime (CPU)", []),
    "large_model": ("a 2.5 GB external-data model through cleanup,fuse", []),
    "llm_decode_cpu": ("LLM decoding with a KV cache (CPU)", ["--out", os.devnull]),
    "precision_cpu": ("bf16 and int8 vs ORT fp32 and ORT dynamic int8 (CPU)", ["--out", os.devnull]),
    "int4_cpu": ("int4 weight-only vs ORT's MatMulNBitsQuantizer (CPU)", ["--out", os.devnull]),
    "sharding_cpu": ("tensor parallelism: 1 process x 2 threads vs 2 gloo ranks x 1 thread (CPU)", []),
    "recipes_minilm": ("fidelity of docs/recipes.md's pipelines and of the lossy passes' defaults on the real all-MiniLM-L6-v2 (no timing)", []),
}


def run(name: str, extra: list[str]) -> str:
    script = ROOT / "benchmarks" / f"{name}.py"
    started = time.time()
    try:
        completed = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"(stopped after the {TIMEOUT_S // 60}-minute limit of run_all.py)\n"
    minutes = (time.time() - started) / 60
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-5:])
        return f"(failed after {minutes:.1f} min, exit {completed.returncode})\n\n```\n{tail}\n```\n"
    return completed.stdout.strip() + "\n"


def header() -> str:
    sys.path.insert(0, str(ROOT))
    from graphopt.bench import _versions, machine_description

    return f"Measured {time.strftime('%Y-%m-%d')} on {machine_description()}; {_versions()}."


def _markdown(text: str) -> str:
    """A saved result as markdown: the header line, then the output (fixed-width text fenced)."""
    header, _, body = text.partition("\n\n")
    if any(line.startswith("|") for line in body.splitlines()):
        return text
    return f"{header}\n\n```text\n{body.strip()}\n```"


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    parts = []
    for name, (title, _) in BENCHMARKS.items():
        result = RESULTS / f"{name}.md"
        if result.exists():
            parts.append(f"### {title}\n\n`python benchmarks/{name}.py`\n\n{_markdown(result.read_text().strip())}\n")
    body = "\n".join(parts) if parts else "(no saved results yet: run `python benchmarks/run_all.py`)\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(f"{before}{START}\n{body}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--readme-only", action="store_true", help="only rebuild the README section from saved results")
    args = parser.parse_args()
    if not args.readme_only:
        RESULTS.mkdir(exist_ok=True)
        names = args.only.split(",") if args.only else list(BENCHMARKS)
        for name in names:
            if name not in BENCHMARKS:
                raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
            print(f"running {name} ...", flush=True)
            output = run(name, BENCHMARKS[name][1])
            measured = output if output.startswith("Measured ") else f"{header()}\n\n{output}"  # some print their own
            (RESULTS / f"{name}.md").write_text(measured)
    update_readme()


if __name__ == "__main__":
    main()
