"""The option declarations (`runtime.options`) are the one source: the README's table, the command line's
flags, the HTTP request models and validate_request's defaults all agree with them, and every size a
request chooses is capped."""

import argparse
import json
import re
from pathlib import Path

import pytest

import runtime.__main__ as cli
from runtime.configs import transformer_config
from runtime.options import (DEFAULT_MOTION_FLOW, MAX_DIFFUSION_STEPS, MAX_IMAGES_PER_REQUEST, MAX_LATENT_LENGTH,
                             MAX_MASK_STEPS, MAX_PROMPT_CHARS, MAX_REQUEST_BYTES, OPTIONS, SEED_LIMIT)
from runtime.request import validate_request
from serve.schema import IMAGE_OPTIONS, VIDEO_OPTIONS, ImageRequest, VideoRequest

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_table() -> dict[str, list[str]]:
    """The first table of the README's "Generation options" section: option -> its cells."""
    section = README.read_text().split("\n## Generation options\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.split("\n\n| option |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    return rows


def _shown(default) -> str:
    return "None" if default is None else f"{default:g}"


def test_the_readme_table_lists_exactly_the_declared_options_with_their_defaults_and_flags():
    table = _readme_table()
    assert list(table) == list(OPTIONS)
    for name, (_, default, _, _, runner) in table.items():
        assert default.split()[0].strip("`") == _shown(OPTIONS[name].default), name
        if OPTIONS[name].build_flag:
            assert f"`{OPTIONS[name].build_flag}`" in runner, name


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", ["generate", "reference"])
def test_the_cli_flags_are_the_declared_options(command):
    subparsers = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = _flags(subparsers.choices[command])
    numbers = [o for o in OPTIONS.values() if o.type in (int, float)]
    assert set(numbers) <= set(cli.FLAG_OPTIONS)
    for option in cli.FLAG_OPTIONS:
        action = flags[option.flag]
        assert (action.dest, action.default, action.type) == (option.name, option.default, option.type)


def test_the_http_models_are_the_declared_options():
    for model, names, extra in ((ImageRequest, IMAGE_OPTIONS, set()),
                                (VideoRequest, (*VIDEO_OPTIONS, "image"), {"fps"})):
        fields = model.model_fields
        assert set(fields) == {"model", "seed", *names} | extra
        assert fields["prompt"].is_required()
        assert {n: fields[n].default for n in names if n != "prompt"} == {n: OPTIONS[n].default for n in names
                                                                           if n != "prompt"}
    assert ImageRequest.model_validate({"prompt": "a", "seed": SEED_LIMIT - 1}).seed == SEED_LIMIT - 1
    with pytest.raises(ValueError, match="less than 18446744073709551616"):
        ImageRequest.model_validate({"prompt": "a", "seed": SEED_LIMIT})


@pytest.fixture(scope="module")
def video_config(tiny_t2v):
    return transformer_config(tiny_t2v)


def test_validate_request_takes_the_declared_defaults(video_config):
    request = validate_request(video_config, "a")
    for name, option in OPTIONS.items():
        if option.type in (int, float) and name != "motion_flow":
            assert getattr(request, name) == option.default, name
    assert request.motion_flow == DEFAULT_MOTION_FLOW


@pytest.mark.parametrize("options, message", [
    (dict(num_inference_steps=MAX_MASK_STEPS + 1), f"num_inference_steps must be at most {MAX_MASK_STEPS}"),
    (dict(num_diffusion_steps=10 ** 6), f"num_diffusion_steps must be at most {MAX_DIFFUSION_STEPS}"),
    (dict(max_latent_length=MAX_LATENT_LENGTH + 1), f"max_latent_length must be at most {MAX_LATENT_LENGTH}"),
    (dict(num_images_per_prompt=MAX_IMAGES_PER_REQUEST + 1), f"must be at most {MAX_IMAGES_PER_REQUEST}"),
    (dict(prompt=["a"] * 33, num_images_per_prompt=2), f"= 66 images: at most {MAX_IMAGES_PER_REQUEST} per request"),
    (dict(prompt="a" * (MAX_PROMPT_CHARS + 1)), f"prompt entry 0 has 4097 characters: at most {MAX_PROMPT_CHARS}"),
    (dict(prompt=["a", "b"], negative_prompt=["a", "b" * 10 ** 7]), "negative_prompt entry 1 has 10000000 characters"),
])
def test_every_size_a_request_chooses_is_capped(video_config, options, message):
    options = {"prompt": "a", **options}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_request(video_config, **options)


def test_a_request_at_every_cap_is_valid_and_fits_the_body_limit(video_config):
    prompts = ["\U0001F600" * MAX_PROMPT_CHARS] * MAX_IMAGES_PER_REQUEST  # the longest JSON escape per character
    options = dict(negative_prompt=prompts, num_inference_steps=MAX_MASK_STEPS, num_diffusion_steps=MAX_DIFFUSION_STEPS,
                   max_latent_length=MAX_LATENT_LENGTH, guidance_scale=5.0, guidance_trunc=0.5, flow_shift=3.0,
                   motion_flow=5.0, num_images_per_prompt=1)
    assert validate_request(video_config, prompts, **options).batch == MAX_IMAGES_PER_REQUEST
    body = json.dumps({"model": "m" * 200, "prompt": prompts, **options, "seed": SEED_LIMIT - 1, "fps": 240})
    assert len(body.encode()) <= MAX_REQUEST_BYTES
    VideoRequest.model_validate_json(body)


def test_the_reference_signature_spells_the_declared_defaults():
    """ReferencePipeline.__call__ keeps the official signature (keywords with defaults, as diffusers'
    pipelines): checked against the declaration, so the copy cannot drift."""
    import inspect

    from runtime.reference import ReferencePipeline

    parameters = inspect.signature(ReferencePipeline.__call__).parameters
    assert {name: parameters[name].default for name in OPTIONS} == {n: o.default for n, o in OPTIONS.items()}


def test_build_flags_named_by_options_and_refusals_exist_on_the_build_command():
    """The flags the declaration and the build's refusals name are flags of export/build_engines.py."""
    from export.build_engines import parser
    from runtime.graphs.capabilities import BUILD_FLAGS

    flags = {flag for action in parser()._actions for flag in action.option_strings}
    named = {option.build_flag for option in OPTIONS.values() if option.build_flag} | set(BUILD_FLAGS.values())
    assert sorted(named - flags) == []
