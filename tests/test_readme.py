"""The README's embedding example runs as written (against an engine folder built here)."""

import re
from pathlib import Path

import numpy as np

from runtime.runner import STAGES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_embedding_example_runs(t2i_fp16_engines, capsys):
    text = README.read_text()
    block = re.search(r"### Embedding `NOVARunner`.*?```python\n(.*?)```", text, re.S).group(1)
    names: dict = {}
    exec(compile(block.replace('"engines/tiny-t2i-fp16"', repr(str(t2i_fp16_engines))), "README.md", "exec"), names)
    result, image = names["result"], names["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 0  # decoded pixels
    assert result.latents.shape == (1, 4, 1, 8, 8)
    assert set(result.timings) == set(STAGES) and all(t > 0 for t in result.timings.values())
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(names["runner"].describe_build()) and "1 image(s) per call" in printed[0]
    assert printed[1] == "3 prompt(s) x 1 image(s) = 3 images per call; these engines were built for " \
                         + names["runner"].describe_build() + " (rebuild with --prompts 3 --images-per-prompt 1)"
