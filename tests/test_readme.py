"""The README's embedding example runs as written (against an engine folder built here)."""

import re
from pathlib import Path

from export.build import BuildOptions, build
from runtime.graphs.profile import BuildProfile

README = Path(__file__).resolve().parents[1] / "README.md"


def test_embedding_example_runs(tiny_t2i, tmp_path, capsys):
    text = README.read_text()
    block = re.search(r"### Embedding `NOVARunner`.*?```python\n(.*?)```", text, re.S).group(1)
    out = tmp_path / "engines"
    build(BuildOptions(checkpoint=tiny_t2i, out=out, precision="fp16", profile=BuildProfile(), progress=False),
          report=lambda message: None)
    exec(compile(block.replace('"engines/tiny-t2i-fp16"', repr(str(out))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "1 image(s) per call" in printed and "'denoise'" in printed
    assert "3 prompt(s) x 1 image(s) = 3 images per call" in printed
