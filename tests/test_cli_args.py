"""The one command-line normaliser behind ``sacpo merge``, ``evaluate``, ``generate`` and ``pipeline``."""

from __future__ import annotations

from dataclasses import dataclass, field

from jsonargparse import ArgumentParser

from sacpo_lightning.cli_args import command_argv


@dataclass
class Options:
    models: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    do_sample: bool = False
    kl_prompts: str | None = None


def _parse(argv: list[str]) -> dict:
    parser = ArgumentParser()
    parser.add_class_arguments(Options, nested_key=None)
    return parser.parse_args(command_argv(argv, [Options])).as_dict()


def test_spellings_parse_to_the_same_options():
    expected = {"models": ["a=b", "c=d", "e"], "weights": [0.25, 0.5], "do_sample": True, "kl_prompts": "p.json"}
    assert _parse(["--models", "a=b", "c=d", "--weights", "0.25", "0.5", "--do_sample", "--kl-prompts", "p.json",
                   "--models", "e"]) == expected
    assert _parse(["--models=[\"a=b\", \"c=d\", \"e\"]", "--weights", "[0.25,0.5]", "--do_sample=true",
                   "--kl_prompts=p.json"]) == expected


def test_numbers_and_strings_keep_their_type():
    assert command_argv(["--weights", "1", "nan", "-inf", "1e-5"], [Options]) == ["--weights=[1.0, .nan, -.inf, 1e-05]"]
    # A string list is JSON, so a value that looks like a number stays a string.
    assert command_argv(["--models", "1", "x y"], [Options]) == ['--models=["1", "x y"]']
    # A bare flag followed by a value is left to jsonargparse.
    assert command_argv(["--do_sample", "false"], [Options]) == ["--do_sample", "false"]
    assert _parse(["--do_sample", "false"])["do_sample"] is False
