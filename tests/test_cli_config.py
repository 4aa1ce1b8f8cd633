"""Options and config files generated from config dataclasses (refusal_core._cli_config); no model."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from refusal_core import _cli_config as cc
from refusal_core.aird import AirdConfig
from refusal_core.errors import InvalidArgumentError
from refusal_core.selection import SelectionConfig
from refusal_core.study import StudyConfig


@dataclass(frozen=True)
class Inner:
    depth: int = 1  # how deep
    ratio: float = 0.5
    """Attribute docstring of ratio."""


@dataclass(frozen=True)
class Knobs:
    steps: int = 3  # optimisation steps
    #: Sphinx-style comment of the flag.
    flag: bool = False
    # One block comment above a run of two fields
    # that applies to both of them.
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None

    label: str = "x"
    rate: float = field(default=0.1, metadata={"help": "help from metadata"})  # not this comment
    inner: Inner = field(default_factory=lambda: Inner(depth=5))
    names: tuple[str, ...] = ("a", "b")
    pair: tuple[int, int] = (1, 2)


TABLE = {("Knobs", "label"): "help from the table"}


def _by_key(options: list[cc.ConfigOption]) -> dict[str, cc.ConfigOption]:
    return {o.key: o for o in options}


def test_help_comes_from_metadata_comments_docstrings_and_the_table() -> None:
    opts = _by_key(cc.config_options(Knobs, table=TABLE))
    expected = {
        "steps": ("optimisation steps", "comment"),
        "flag": ("Sphinx-style comment of the flag.", "comment"),
        "layers": ("One block comment above a run of two fields that applies to both of them.", "comment"),
        # the block above 'layers' is not carried to the next field: the field's name in words
        "positions": ("positions", "none"),
        "label": ("help from the table", "table"),
        "rate": ("help from metadata", "metadata"),
        "inner.depth": ("how deep", "comment"),
        "inner.ratio": ("Attribute docstring of ratio.", "docstring"),
        "names": ("names", "none"),
    }
    for key, (text, source) in expected.items():
        assert (opts[key].help, opts[key].help_source) == (text, source), f"help of Knobs.{key}"


def test_a_blank_line_ends_a_comment_block() -> None:
    # 'label' follows a blank line after the block's run, so without the table it has no help.
    assert cc.field_help(Knobs, "label") == ("label", "none"), "blank line ends the block of Knobs.layers"


@dataclass(frozen=True)
class Carried:
    first: int = 1
    #: the comment of second only
    second: str | None = None
    third: tuple[str, ...] = ("a",)
    fourth: int = 4  # fourth's own comment
    fifth: bool = False


def test_a_comment_block_documents_only_the_field_below_it() -> None:
    opts = _by_key(cc.config_options(Carried, table={("Carried", "fifth"): "fifth from the table"}))
    got = {k: (o.help, o.help_source) for k, o in opts.items()}
    assert got == {
        "first": ("first", "none"),
        "second": ("the comment of second only", "comment"),
        "third": ("third", "none"),
        "fourth": ("fourth's own comment", "comment"),
        "fifth": ("fifth from the table", "table"),
    }, f"help per field: {got}"


def _study_help() -> dict[str, str]:
    """``{flag: help}`` of the config options of ``refusal-core study``, as argparse shows them."""
    from refusal_core.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    study = sub.choices["study"]
    return {
        act.option_strings[0]: study._get_formatter()._expand_help(act)
        for act in study._actions
        if act.dest.startswith("cfg:")
    }


def test_study_help_shows_each_options_own_text_and_its_default() -> None:
    # The old extraction carried dtype's comment block to every uncommented field after it.
    shown = _study_help()
    for flag in ("--methods", "--harmful-train", "--n-train", "--noise-splits"):
        assert "dtype" not in shown[flag], f"{flag} shows another field's help: {shown[flag]!r}"
    assert "compression methods" in shown["--methods"], shown["--methods"]
    assert "dtype" in shown["--dtype"], shown["--dtype"]
    texts: dict[str, str] = {}
    for o in cc.config_options(StudyConfig):
        if o.kind == "other":
            continue
        text = shown[o.flag]
        assert text.endswith(f"(default: {cc._show(o.default)})"), f"{o.flag} shows its default: {text!r}"
        own = text.rsplit(" (default:", 1)[0]
        assert own not in texts, f"{o.flag} shows the same help as {texts.get(own)}: {own!r}"
        texts[own] = o.flag


def test_nested_fields_are_flattened_with_defaults_of_the_default_instance() -> None:
    opts = _by_key(cc.config_options(Knobs))
    assert opts["inner.depth"].flag == "--inner-depth", "nested field flag has the field name as prefix"
    assert opts["inner.depth"].default == 5, (
        "default of a nested field comes from default_factory(), not Inner"
    )
    assert opts["inner.ratio"].default == 0.5
    kinds = {k: (o.kind, o.optional, o.element, o.length) for k, o in opts.items()}
    assert kinds["layers"] == ("tuple", True, int, None), "tuple[int, ...] | None"
    assert kinds["pair"] == ("tuple", False, int, 2), "fixed-length tuple[int, int]"
    assert kinds["flag"] == ("bool", False, None, None)


def _parse(argv: list[str], cls: type = Knobs) -> dict[str, object]:
    p = argparse.ArgumentParser(exit_on_error=False)
    cc.add_config_options(p, cc.config_options(cls))
    return cc.cli_overrides(p.parse_args(argv))


def test_command_line_values_are_typed_and_only_given_ones_are_returned() -> None:
    assert _parse([]) == {}, "nothing given, nothing overridden (defaults stay in the dataclass)"
    got = _parse(
        [
            "--steps",
            "7",
            "--no-flag",
            "--layers",
            "0,2",
            "--positions",
            "none",
            "--names",
            "",
            "--pair",
            "3,4",
        ]
    )
    assert got == {
        "steps": 7,
        "flag": False,
        "layers": (0, 2),
        "positions": None,
        "names": (),
        "pair": (3, 4),
    }, f"parsed overrides {got}"
    assert _parse(["--flag"]) == {"flag": True}
    assert _parse(["--inner-ratio", "inf"])["inner.ratio"] == math.inf


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "-1"],  # a negative count
        ["--steps", "1.5"],  # not an int
        ["--pair", "1,2,3"],  # wrong length
        ["--layers", "1,,2"],  # empty item
        ["--names", "none"],  # 'none' for a field that is not Optional is a plain string ...
    ],
)
def test_bad_command_line_values_are_refused(argv: list[str]) -> None:
    if argv[0] == "--names":
        assert _parse(argv) == {"names": ("none",)}, "'none' is only special for Optional fields"
        return
    with pytest.raises(argparse.ArgumentError):
        _parse(argv)


def test_precedence_default_then_file_then_command_line(tmp_path: Path) -> None:
    cfg_file = tmp_path / "study.toml"
    cfg_file.write_text(
        'n_train = 5\nn_val = 7\nmethods = ["wanda"]\n'
        "[aird]\nalpha_attn = 1\n[selection]\nkl_threshold = 0.5\n"
    )
    options = cc.config_options(StudyConfig)
    from_file = cc.read_config_file(cfg_file, StudyConfig, options)
    cfg = cc.build_config(StudyConfig, from_file, {"n_val": 9, "selection.kl_threshold": 0.25})
    d = StudyConfig()
    assert cfg.n_train == 5, "file beats default"
    assert cfg.n_val == 9, "command line beats file"
    assert cfg.n_test == d.n_test, "default stays when neither sets it"
    assert cfg.methods == ("wanda",), "TOML list becomes the tuple"
    assert cfg.aird.alpha_attn == 1.0, "file sets a nested field"
    assert isinstance(cfg.aird.alpha_attn, float), "TOML int for a float field becomes a float"
    assert cfg.aird.alpha_mlp == d.aird.alpha_mlp, "sibling field of a nested config keeps its default"
    assert cfg.selection.kl_threshold == 0.25, "command line beats file in a nested config"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("n_trian = 5\n", "'n_trian'"),
        ("[aird]\nalpha = 0.1\n", "'aird.alpha'"),
        ("[nested]\nx = 1\n", "'nested'"),
        ('n_train = "5"\n', "n_train"),
        ("n_train = true\n", "n_train"),
        ("n_train = -2\n", "n_train"),
        ("aird = 3\n", "aird"),
        ("methods = 'wanda'\n", "methods"),
        ("[aird]\nnormalize = 1\n", "aird.normalize"),
        ("n_train = \n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError) as info:
        cc.read_config_file(path, StudyConfig, cc.config_options(StudyConfig))
    assert named in str(info.value), f"error for {text!r} names {named}: {info.value}"


def test_dataclass_validation_runs_on_the_merged_config() -> None:
    with pytest.raises(InvalidArgumentError, match="n_train must be"):
        cc.build_config(StudyConfig, {"n_train": 0})
    with pytest.raises(InvalidArgumentError, match="kl_threshold"):
        cc.build_config(StudyConfig, {"selection.kl_threshold": -1.0})


def test_only_given_fields_reach_the_constructor() -> None:
    # AirdConfig resolves alpha_attn to the paper's 0.02 when no gain is given; passing that resolved
    # value back with a gain would be "both spellings for one module".
    cfg = cc.build_config(StudyConfig, {"aird.gain_attn": 2.0})
    assert cfg.aird == AirdConfig(gain_attn=2.0), (
        f"--aird-gain-attn alone gives AirdConfig(gain_attn=2.0): {cfg.aird}"
    )
    assert cfg.aird.alpha_attn is None, "the alpha of a module given as a gain stays None"
    with pytest.raises(InvalidArgumentError):
        cc.build_config(StudyConfig, {"aird.gain_attn": 2.0, "aird.alpha_attn": 0.1})
    assert cc.build_config(Knobs, {"inner.ratio": 0.25}).inner == Inner(depth=5, ratio=0.25), (
        "a nested default_factory's own values stay for the fields not given"
    )


def test_written_config_reads_back_to_the_same_config(tmp_path: Path) -> None:
    d = StudyConfig()
    cfg = replace(
        d,
        methods=("wanda@0.3", "llm-int8"),
        n_train=3,
        zero_shot_tasks=(),
        refusal_token_ids=(4, 5),
        aird=AirdConfig(alpha_attn=-0.5, gain_mlp=3.0, normalize=True),
        selection=SelectionConfig(kl_threshold=math.inf, system='say "no"\nthen\ttab', positions=(-2, -1)),
        attacks=replace(d.attacks, decoding_top_ks=(0,), gcg_target="Sure\\"),
    )
    text = cc.config_to_toml(cfg, header="line one\nline two")
    assert text.startswith("# line one\n# line two\n"), "header lines are TOML comments"
    cc.parse_toml(text)  # valid TOML
    path = tmp_path / "config.toml"
    path.write_text(text)
    back = cc.build_config(
        StudyConfig, cc.read_config_file(path, StudyConfig, cc.config_options(StudyConfig))
    )
    assert back == cfg, f"round trip through config.toml changed the config:\n{text}"
    # and the defaults, whose Optional fields are None
    path.write_text(cc.config_to_toml(d))
    assert (
        cc.build_config(StudyConfig, cc.read_config_file(path, StudyConfig, cc.config_options(StudyConfig)))
        == d
    )


def test_a_new_field_becomes_an_option_without_declaring_it() -> None:
    @dataclass(frozen=True)
    class AirdPlus(AirdConfig):
        gain_attn: float | None = None  # gain along r at o_proj (instead of alpha_attn)

    opts = _by_key(cc.config_options(AirdPlus))
    assert "gain_attn" in opts, "a field added to a config appears as an option"
    assert opts["gain_attn"].flag == "--gain-attn"
    assert _parse(["--gain-attn", "1.5"], AirdPlus) == {"gain_attn": 1.5}


def test_unsupported_types_are_config_file_only(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class WithTable:
        weights: dict[str, float] = field(default_factory=dict)  # per-name weights
        n: int = 1  # a count

    p = argparse.ArgumentParser()
    file_only = cc.add_config_options(p, cc.config_options(WithTable))
    assert [o.key for o in file_only] == ["weights"], "a dict field gets no argument"
    assert "--weights" not in p.format_help()
    path = tmp_path / "w.toml"
    path.write_text("weights = {a = 1.5}\n")
    got = cc.read_config_file(path, WithTable, cc.config_options(WithTable))
    assert cc.build_config(WithTable, got) == WithTable(weights={"a": 1.5}), (
        "it is still settable in the file"
    )
