"""The architecture as the layout states it: the runtime never imports the build, no module of either
imports itself back through others, and the core needs no torch (read from the source, nothing is
imported; one test then imports the core with torch blocked)."""

import subprocess
import sys
from pathlib import Path

from runtime.sources import imported, module_paths

ROOT = Path(__file__).resolve().parents[1]

# The torch-free core: what a TensorRT or ONNX Runtime deployment runs, needing only numpy, PIL, PyAV,
# tokenizers and the backend's own library.
CORE = ("runtime", "runtime.__main__", "runtime.backends", "runtime.backends.base", "runtime.backends.cuda_graphs",
        "runtime.backends.onnxruntime_backend", "runtime.backends.open", "runtime.backends.tensorrt_backend",
        "runtime.cancellation", "runtime.cli", "runtime.configs", "runtime.decoder", "runtime.diffusion_loops",
        "runtime.draws", "runtime.engine_folder", "runtime.feeds", "runtime.files", "runtime.graphs",
        "runtime.graphs.capabilities", "runtime.graphs.profile", "runtime.guidance_plan", "runtime.images",
        "runtime.media", "runtime.model.config", "runtime.options", "runtime.progress", "runtime.request",
        "runtime.runner", "runtime.schedules", "runtime.sources", "runtime.tokenizer", "runtime.variants")
# The torch layer: the modules, the graphs and their declarations, weights, the eager reference, the build.
TORCH_LAYER = ("runtime.backends.torch_backend", "runtime.checkpoint", "runtime.graphs.common",
               "runtime.graphs.contract", "runtime.graphs.denoise", "runtime.graphs.spatial", "runtime.graphs.specs",
               "runtime.graphs.temporal", "runtime.graphs.text_encoder", "runtime.graphs.vae", "runtime.guidance",
               "runtime.model", "runtime.model.kv_cache", "runtime.model.text_encoder", "runtime.model.transformer",
               "runtime.model.vae", "runtime.model.vae_opensora", "runtime.reference", "export", "export.attention",
               "export.convolution",
               "export.build", "export.build_engines", "export.manifest", "export.onnx_export",
               "export.tensorrt_build", "export.validate")
# Core -> torch edges that are deliberate: each is an optional use, taken only where torch is installed.
TORCH_ALLOWED = {
    ("runtime.__main__", "runtime.checkpoint"): "the reference and synth commands load or write weights",
    ("runtime.__main__", "runtime.reference"): "the reference command runs the eager pipeline",
    ("runtime.__main__", "torch"): "the reference command seeds a torch.Generator and sets torch's threads",
    ("runtime.draws", "torch"): "RandomDraws: torch.Generator draws, the reference's numbers (else NumpyDraws)",
    ("runtime.backends.open", "runtime.backends.torch_backend"): "backend='torch' runs the graphs' torch modules",
    ("runtime.backends.open", "runtime.graphs.specs"): "backend='torch' builds the graphs' torch modules",
    ("runtime.schedules", "torch"): "torch's float32 sqrt and linspace where installed (bit-equal to diffusers); "
                                    "SamplerTable.step updates the reference's tensors",
}


def _imports(modules: dict[str, Path], external: bool = False) -> dict[str, set[str]]:
    """Each module's imports (top level or inside functions) of another module of ours (and, if `external`,
    of everything else)."""
    edges = {name: imported(path, modules) - {name} for name, path in modules.items()}
    return edges if external else {name: targets & modules.keys() for name, targets in edges.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_runtime_does_not_import_the_build():
    edges = _imports(module_paths(ROOT))
    assert edges["runtime.runner"] and edges["export.build"]  # the reader sees imports at all
    wrong = sorted(f"{m} -> {t}" for m, targets in edges.items() if m.startswith("runtime") for t in targets
                   if t.startswith("export"))
    assert wrong == []


def test_no_import_cycle():
    assert _cycle(_imports(module_paths(ROOT))) is None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def _is_torch(name: str) -> bool:
    return name.split(".")[0] == "torch" or name.endswith(".torch")  # torch itself, or a library's torch part


def _torch_paths(edges: dict[str, set[str]], core: tuple[str, ...], allowed) -> list[list[str]]:
    """Each path by which a core module reaches torch or the torch layer (a module outside `core`),
    following imports through core modules, except the allowed edges."""
    paths = []
    for start in core:
        seen, stack = {start}, [[start]]
        while stack:
            path = stack.pop()
            for target in sorted(edges.get(path[-1], ())):
                if (path[-1], target) in allowed or target in seen:
                    continue
                if _is_torch(target) or (target in edges and target not in core):
                    paths.append(path + [target])
                elif target in core:
                    seen.add(target)
                    stack.append(path + [target])
    return paths


def test_every_module_is_in_the_core_or_the_torch_layer():
    modules = set(module_paths(ROOT))
    assert sorted(modules - set(CORE) - set(TORCH_LAYER)) == []
    assert set(CORE) & set(TORCH_LAYER) == set() and set(CORE) | set(TORCH_LAYER) <= modules


def test_the_core_imports_no_torch():
    edges = _imports(module_paths(ROOT), external=True)
    assert "torch" in edges["runtime.reference"]  # the reader sees torch imports at all
    assert [" -> ".join(path) for path in _torch_paths(edges, CORE, TORCH_ALLOWED)] == []
    used = {(m, t) for m, targets in edges.items() for t in targets}
    assert sorted(set(TORCH_ALLOWED) - used) == []  # no stale allowance
    serving = sorted(f"{m} -> {t}" for m in CORE for t in edges[m] if t.split(".")[0] in ("pydantic", "fastapi", "ray"))
    assert serving == []  # serving's libraries stay in serve/


def test_the_torch_finder_follows_imports_through_the_core():
    edges = {"a": {"b", "numpy"}, "b": {"c"}, "c": {"torch.nn"}, "d": {"e"}, "e": {"safetensors.torch"}}
    assert _torch_paths(edges, ("a", "b", "c", "d"), {}) == [["a", "b", "c", "torch.nn"], ["b", "c", "torch.nn"],
                                                             ["c", "torch.nn"], ["d", "e"]]
    assert _torch_paths(edges, ("a", "b", "c"), {("b", "c"): "why"}) == [["c", "torch.nn"]]


def test_the_core_imports_with_torch_blocked():
    blocked = "import sys\nfor name in ('torch', 'pydantic'):\n    sys.modules[name] = None\n" + "\n".join(
        f"import {m}" for m in CORE)
    result = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_no_tracked_file_holds_a_merge_conflict():
    """A merge once committed README.md with its conflict markers; they would have shipped as documentation."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    markers = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")
    conflicted = [name for name in files if (ROOT / name).is_file() and (ROOT / name).suffix in (".md", ".py", ".html",
                                                                                                  ".toml", ".sh", "")
                  and any(line.startswith(markers) for line in (ROOT / name).read_text(errors="replace")
                          .splitlines(keepends=True))]
    assert not conflicted, f"merge-conflict markers in {conflicted}"
