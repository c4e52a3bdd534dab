"""The command lines, `python -m runtime` and `export/build_engines.py`: help at once, the request and
--out checked before any work, flags named like the options they set, one-line errors, Ctrl-C."""

import argparse
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime.__main__ as cli
from export import build_engines

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FAST = ["--num-inference-steps", "8", "--num-diffusion-steps", "2"]


def _run(*args, **kwargs):
    return subprocess.run([PYTHON, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, **kwargs)


# What makes a command line slow to answer (seconds each on a busy machine): none may load before parsing.
HEAVY = ("torch", "onnxruntime", "onnx", "transformers", "diffusers", "ray", "PIL", "av", "tokenizers")


def _heavy_imports(*args) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run a command with `-X importtime`; -> its result and the heavy packages it imported. Counting imports
    instead of timing the call keeps the check exact on a loaded machine."""
    result = _run("-X", "importtime", *args)
    names = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
             if line.startswith("import time:")}
    return result, sorted(names & set(HEAVY))


def _generate(engines, *args):
    return cli.main(["generate", "--engines", str(engines), "--prompt", "a fox", *args])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("command", [["-m", "runtime"], ["-m", "runtime", "generate"], ["-m", "runtime", "reference"],
                                     ["-m", "runtime", "synth"], ["export/build_engines.py"], ["-m", "serve"]],
                         ids=" ".join)
def test_help_answers_at_once_and_shows_each_default_once(command):
    result, heavy = _heavy_imports(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout
    assert heavy == [], f"--help imports {heavy} before parsing"
    text = " ".join(result.stdout.split())  # undo the wrapping
    assert "(default: None)" not in text and "(default: [])" not in text
    assert not re.search(r"\(default[^)]*\) \(default", text)


def test_argument_errors_answer_at_once():
    result, heavy = _heavy_imports("export/build_engines.py", "--synthetic", "huge")
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr
    assert heavy == [], f"an argument error imports {heavy} first"


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield action


def test_every_flag_has_help_and_both_entry_points_a_version(capsys):
    for parser in (cli.parser(), build_engines.parser()):
        assert [a.option_strings for a in _actions(parser) if not a.help] == []
    expected = f"nova-runtime {importlib.metadata.version('nova-runtime')}"
    for main in (cli.main, build_engines.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == expected


def test_flags_are_named_like_the_options_with_the_short_forms_as_aliases():
    args = cli.parser().parse_args(["generate", "--engines", "e", "--prompt", "p", "--out", "o.mp4", "--steps", "9",
                                    "--diffusion-steps", "3", "--latent-length", "5", "--motion-flow", "2"])
    long = cli.parser().parse_args(["generate", "--engines", "e", "--prompt", "p", "--out", "o.mp4",
                                    "--num-inference-steps", "9", "--num-diffusion-steps", "3",
                                    "--max-latent-length", "5", "--motion-flow", "2"])
    assert args == long
    defaults = {o.name: o.default for o in cli.FLAG_OPTIONS}
    assert cli._options(args) == defaults | dict(num_inference_steps=9, num_diffusion_steps=3, max_latent_length=5,
                                                 motion_flow=2.0, image=None)


def test_the_build_capacity_flags_read_as_capacities_with_the_old_spellings_as_aliases():
    new = build_engines.parser().parse_args(["--latent-capacity", "9", "--loop-diffusion-steps", "4"])
    old = build_engines.parser().parse_args(["--max-latent-length", "9", "--diffusion-steps", "4"])
    assert new == old and (new.latent_capacity, new.loop_diffusion_steps) == (9, 4)
    defaults = build_engines.parser().parse_args([])
    assert (defaults.latent_capacity, defaults.loop_diffusion_steps, defaults.min_mask_steps) == (None, 25, 64)


def test_the_cli_takes_every_number_option_of_the_api():
    args = cli.parser().parse_args(["reference", "--synthetic", "tiny-t2i", "--prompt", "p", "--out", "o.png",
                                    "--num-images-per-prompt", "2", "--guidance-trunc", "0.5", "--flow-shift", "3",
                                    "--image-guidance-scale", "1.5", "--spatiotemporal-guidance-scale", "0.5",
                                    "--guidance-renorm", "0.8", "--threads", "3"])
    assert {k: v for k, v in cli._options(args).items() if k in {
        "num_images_per_prompt", "guidance_trunc", "flow_shift", "image_guidance_scale",
        "spatiotemporal_guidance_scale", "guidance_renorm"}} == dict(
        num_images_per_prompt=2, guidance_trunc=0.5, flow_shift=3.0, image_guidance_scale=1.5,
        spatiotemporal_guidance_scale=0.5, guidance_renorm=0.8)
    assert args.threads == 3 and cli.parser().parse_args(["generate", "--engines", "e", "--prompt", "p", "--out",
                                                          "o.png"]).threads == len(os.sched_getaffinity(0))


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command gets as far as loading the engines."""
    from runtime.runner import NOVARunner

    def load(*args, **kwargs):
        raise AssertionError("loaded the engines before refusing the request")
    monkeypatch.setattr(NOVARunner, "from_engines", load)


def test_bad_out_is_refused_before_any_work_in_one_line(t2i_engines, tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    for out, message in [(tmp_path / "file" / "x.png", "file is not a folder"),
                         (tmp_path / "folder.png", "is a folder"),
                         (tmp_path / "x.mp4", "this request produces an image: --out must end in .png")]:
        assert _generate(t2i_engines, "--out", str(out)) == 2
        assert message in _error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "read-only").mkdir(mode=0o555)
        assert _generate(t2i_engines, "--out", str(tmp_path / "read-only" / "new" / "x.png")) == 2
        assert "cannot write in" in _error_line(capsys)


def test_the_request_is_checked_before_the_out_suffix_with_flag_names(t2i_engines, tmp_path, capsys, no_loading):
    assert _generate(t2i_engines, "--latent-length", "0", "--out", str(tmp_path / "x.mp4")) == 2
    assert _error_line(capsys) == "error: --max-latent-length must be an integer >= 1, got 0"
    assert _generate(t2i_engines, "--num-inference-steps", "0", "--out", str(tmp_path / "x.png")) == 2
    assert _error_line(capsys) == "error: --num-inference-steps must be an integer >= 1, got 0"
    assert _generate(t2i_engines, "--max-latent-length", "3", "--out", str(tmp_path / "x.mp4")) == 2
    assert "image checkpoint: --max-latent-length must be 1" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_compile_without_the_torch_backend_is_refused_before_loading(t2i_engines, tmp_path, capsys, no_loading):
    for backend in ("auto", "onnxruntime"):
        assert _generate(t2i_engines, "--compile", "--backend", backend, "--out", str(tmp_path / "x.png")) == 2
        assert _error_line(capsys) == f"error: --compile needs --backend torch (torch.compile runs the graphs' " \
                                      f"PyTorch modules), got --backend {backend}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64), str(2 ** 70)])
@pytest.mark.parametrize("command", ["generate", "reference"])
def test_the_seed_range_is_checked_before_loading_naming_the_flag(command, seed, t2i_engines, tiny_t2i, tmp_path,
                                                                  capsys, no_loading):
    source = ["--engines", str(t2i_engines)] if command == "generate" else ["--checkpoint", str(tiny_t2i)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, *source, "--prompt", "a fox", "--seed", seed, "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert re.search(r"argument --seed: must be (an integer >= 0|at most 18446744073709551615), got",
                     capsys.readouterr().err)


def test_reference_checks_the_request_without_importing_torch(tiny_t2i, tmp_path):
    blocked = ("import sys; sys.modules['torch'] = None; from runtime.__main__ import main; "
               f"sys.exit(main(['reference', '--checkpoint', {str(tiny_t2i)!r}, '--prompt', 'a', "
               f"'--num-diffusion-steps', '1001', '--out', {str(tmp_path / 'x.png')!r}]))")
    result = _run("-c", blocked)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: --num-diffusion-steps must be at most 1000 (the schedulers' 1000 training " \
                            "timesteps), got 1001\n"


def test_threads_reach_torch_and_onnxruntime(t2i_engines, tiny_t2i, tmp_path, monkeypatch):
    import torch

    from runtime.runner import NOVARunner

    opened = []
    from_engines = NOVARunner.from_engines
    monkeypatch.setattr(NOVARunner, "from_engines", lambda *a, **k: opened.append(from_engines(*a, **k)) or opened[-1])
    before = os.environ.get("NOVA_ORT_THREADS")  # the suite's (tests/conftest.py)
    assert _generate(t2i_engines, *FAST, "--threads", "2", "--out", str(tmp_path / "a.png")) == 0
    session = next(iter(opened[0].backend.sessions.values()))
    assert session.get_session_options().intra_op_num_threads == 2
    assert os.environ.get("NOVA_ORT_THREADS") == before  # set for the sessions only
    from runtime.reference import ReferencePipeline

    loading = []
    from_pretrained = ReferencePipeline.from_pretrained
    monkeypatch.setattr(ReferencePipeline, "from_pretrained",
                        lambda *a, **k: loading.append(torch.get_num_threads()) or from_pretrained(*a, **k))
    before = torch.get_num_threads()
    assert cli.main(["reference", "--checkpoint", str(tiny_t2i), "--prompt", "a", "--steps", "2",
                     "--diffusion-steps", "1", "--threads", str(before + 1), "--out", str(tmp_path / "b.png")]) == 0
    assert loading == [before + 1] and torch.get_num_threads() == before  # set for the call only


def test_runner_messages_name_the_flags(t2i_engines, tmp_path, capsys):
    # engines built for >= 8 mask steps: the runner refuses 2, after loading
    assert _generate(t2i_engines, "--steps", "2", "--out", str(tmp_path / "x.png")) == 2
    assert "error: --num-inference-steps 2 predicts up to" in capsys.readouterr().err
    assert cli.flag_names("guidance_scale 1 turns off; max_latent_length, motion_flow, negative_prompt, prompt") == \
        "--guidance-scale 1 turns off; --max-latent-length, --motion-flow, --negative-prompt, prompt"


def test_any_case_of_the_suffix(t2i_engines, tmp_path, capsys):
    out = tmp_path / "new" / "FOX.PNG"
    assert _generate(t2i_engines, *FAST, "--motion-flow", "5", "--out", str(out)) == 0
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
    assert "onnxruntime backend" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate", "reference"])
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(command, t2i_engines, tiny_t2i, tmp_path, capsys):
    """In this process (a subprocess would spend seconds importing the reference): the captured stderr is not a
    terminal, as a pipe is not (the Ctrl-C tests below read a real pipe)."""
    source = ["--engines", str(t2i_engines)] if command == "generate" else ["--checkpoint", str(tiny_t2i)]
    assert cli.main([command, *source, "--prompt", "a fox", *FAST, "--threads", "1",
                     "--out", str(tmp_path / "x.png")]) == 0
    stderr = capsys.readouterr().err
    assert "\r" not in stderr
    assert re.search(r"^mask steps: +0%.* 0/\d+ ", stderr, re.M), stderr


def test_progress_lines_are_one_per_interval():
    import io

    from runtime.cli import ProgressLines

    log = io.StringIO()
    lines = ProgressLines(log, interval=3600)
    for text in ["\rbar 0/9", "\rbar 1/9", "a warning\n", "\r     \r"]:
        lines.write(text)
    assert log.getvalue() == "bar 0/9\na warning\n"
    lines.interval = 0
    lines.write("\rbar 2/9")
    assert log.getvalue().endswith("bar 2/9\n")


def test_a_one_latent_video_is_written_once_as_a_png(tiny_t2v, tmp_path, capsys):
    out = tmp_path / "wave.png"
    assert cli.main(["reference", "--checkpoint", str(tiny_t2v), "--prompt", "waves", "--latent-length", "1",
                     "--steps", "2", "--diffusion-steps", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {out}\n")  # once, not mp4 and PNG strip at the same path
    assert np.asarray(Image.open(out)).shape == (64, 96, 3) and list(tmp_path.iterdir()) == [out]
    frames = np.zeros((2, 5, 8, 8, 3), np.uint8)  # two videos: an mp4 and a strip each
    assert [p.name for p in cli.save_output(frames, tmp_path / "v.MP4", 12)] == ["v-0.MP4", "v-0.png", "v-1.MP4",
                                                                                  "v-1.png"]


def _interrupt(args, stream: str):
    """Start a command, wait until it prints its first line on `stream` (it is working), press Ctrl-C.
    -> exit status, the first line, the rest of stdout, the rest of stderr."""
    # A terminal's Ctrl-C: SIGINT at its default in the child, even when the suite runs where it is ignored (a
    # background job of a non-interactive shell), which the child would inherit. A caught signal is reset to its
    # default at exec, so the parent catches it while it starts the child. (Not a preexec_fn: Python code between
    # fork and exec crashed the child in a worker whose Ray client had gRPC threads running.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([PYTHON, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        first = getattr(process, stream).readline()
        assert first, process.communicate()[1]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, first, out, err


def test_ctrl_c_during_a_generation_prints_one_line_and_exits_130(t2i_engines, tmp_path):
    out = tmp_path / "x.png"
    # 64 mask x 1000 denoising steps: minutes of work, interrupted once it has started
    code, first, _, err = _interrupt(["-m", "runtime", "generate", "--engines", str(t2i_engines), "--prompt", "a fox",
                                      "--num-diffusion-steps", "1000", "--out", str(out)], "stderr")
    assert first.endswith("generating\n")
    *progress, last = err.splitlines()
    assert code == 130 and last == "interrupted" and all(line.startswith("mask steps") for line in progress)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_build_prints_one_line_and_exits_130(tiny_t2i, tmp_path):
    code, first, out, err = _interrupt(["export/build_engines.py", "--checkpoint", str(tiny_t2i), "--precision",
                                        "fp32", "--out", str(tmp_path / "engines")], "stdout")
    assert first.startswith("building ") and "\r" not in out + err  # no progress bars off a terminal
    assert code == 130 and err == "interrupted\n"
