"""The graph contract's shape grammar (no eval) and the content keys' code part, derived from the imports."""

import pytest

from export import manifest as mf
from runtime.graphs.contract import TensorSpec, sources
from runtime.sources import reachable_files


def test_derived_sizes_follow_the_shape_grammar():
    spec = TensorSpec("pixels", "uint8", ("vae_batch", "4*window-3", 2, "(window+1)*2-window"))
    assert spec.concrete({"vae_batch": 3, "window": 5}) == (3, 17, 2, 7)
    with pytest.raises(ValueError, match=r"shape entry '4\*window-3' needs dim 'window'; given vae_batch"):
        spec.concrete({"vae_batch": 3})


@pytest.mark.parametrize("entry", ["__import__('os').getcwd()", "window**2", "window/2", "2.5*window", "window-",
                                   "dims['window']", "-window"])
def test_anything_else_is_refused_at_declaration(entry):
    with pytest.raises(ValueError, match="is not a dim name or an expression of names and integers"):
        TensorSpec("x", "float32", (entry,))


def _package(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_graphs_sources_are_what_its_module_imports_transitively(tmp_path):
    _package(tmp_path, {
        "runtime/__init__.py": "def __getattr__(name):\n    from runtime import runner\n",  # lazy: not followed
        "runtime/runner.py": "",
        "runtime/graphs/__init__.py": "from runtime.graphs.profile import X\n",
        "runtime/graphs/profile.py": "import numpy\n",
        "runtime/graphs/one.py": "from runtime.graphs import helper\n\n"
                                  "def build():\n    from runtime.model import net\n",
        "runtime/graphs/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import runtime.runner\n",
        "runtime/model/__init__.py": "",
        "runtime/model/net.py": "import torch\nfrom runtime.model.layers import *\n",
        "runtime/model/layers.py": "",
        "runtime/model/unused.py": "",
    })
    assert reachable_files("runtime.graphs.one", tmp_path) == (
        "runtime/__init__.py", "runtime/graphs/__init__.py", "runtime/graphs/helper.py", "runtime/graphs/one.py",
        "runtime/graphs/profile.py", "runtime/model/__init__.py", "runtime/model/layers.py", "runtime/model/net.py")
    before = mf.source_digest(tmp_path, reachable_files("runtime.graphs.one", tmp_path))
    (tmp_path / "runtime/model/layers.py").write_text("WIDTH = 2\n")  # a file two imports away
    assert mf.source_digest(tmp_path, reachable_files("runtime.graphs.one", tmp_path)) != before


def test_the_real_graphs_reach_the_modules_they_are_built_from():
    text = sources("runtime.graphs.text_encoder")  # its module comes through the checkpoint loader
    assert {"runtime/graphs/text_encoder.py", "runtime/graphs/contract.py", "runtime/checkpoint.py",
            "runtime/model/text_encoder.py"} <= set(text)
    assert "runtime/runner.py" not in text and "runtime/graphs/denoise.py" not in text
    assert {"runtime/schedules.py", "runtime/model/transformer.py"} <= set(sources("runtime.graphs.denoise"))
