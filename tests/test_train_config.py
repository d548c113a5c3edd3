"""Config: flags from dataclasses, precedence file < flags, validation messages naming the flag."""

import argparse
import json

import pytest

from streamtrain.errors import UserError
from streamtrain.train.config import (
    RunConfig,
    add_flags,
    flag_values,
    parse_synthetic,
    read_config_file,
    resolve_config,
    write_config,
)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return flag_values(parser.parse_args(argv))


def test_only_given_flags_are_reported():
    assert _parse(["--d-model", "64", "--amp"]) == {"d_model": 64, "amp": True}
    assert _parse([]) == {}


def test_flags_override_file_values_which_override_defaults(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 0.01\n[model]\nd_model = 96\nheads = 3\n[train]\nseed = 5\n')
    cfg = resolve_config(_parse(["--seed", "9"]), read_config_file(tmp_path / "c.toml"))
    assert (cfg.optim.lr, cfg.model.d_model, cfg.model.heads, cfg.train.seed) == (0.01, 96, 3, 9)
    assert cfg.model.layers == RunConfig().model.layers


def test_json_config_and_config_json_round_trip(tmp_path):
    cfg = resolve_config({"d_model": 48, "heads": 2, "out": "run", "synthetic": "5,9"})
    write_config(tmp_path / "config.json", cfg)
    again = resolve_config({}, read_config_file(tmp_path / "config.json"))
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 48


@pytest.mark.parametrize(
    "text, message",
    [
        ('bogus = 1\n', "unknown key 'bogus'"),
        ('[model]\nlr = 1\n', "unknown key model.lr"),
        ('d_model = "wide"\n', "d_model must be int"),
        ('d_model = [\n', "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(UserError, match=message):
        resolve_config({}, read_config_file(tmp_path / "c.toml"))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"d_model": 30, "heads": 4}, "--d-model .30. must be divisible by --heads .4."),
        ({"dropout": 1.5}, "--dropout"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"lr": 0.0}, "--lr"),
        ({"device": "tpu"}, "--device"),
        ({"precision": "fp8"}, "--precision"),
        ({"grad_accum": 0}, "--grad-accum"),
        ({"max_shapes": 0}, "--max-shapes must be >= 1"),
        ({"synthetic": "10"}, "--synthetic expects N,L"),
        ({"nonfinite": "ignore"}, "--nonfinite must be stop or skip"),
        ({"nonfinite_limit": 0}, "--nonfinite-limit must be >= 1"),
    ],
)
def test_validation_names_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        resolve_config(flags)


def test_parse_synthetic():
    assert parse_synthetic("117,33") == (117, 33)
    with pytest.raises(UserError):
        parse_synthetic("5,1")


def test_cross_section_checks():
    with pytest.raises(UserError, match="no training data"):
        resolve_config({"out": "r"}).check_complete()
    with pytest.raises(UserError, match="not both"):
        resolve_config({"out": "r", "data": "d", "synthetic": "4,4"}).check_complete()


def _float_fields():
    """(section, field name) of every float option of the config dataclasses, optional ones included."""
    import dataclasses
    import typing

    from streamtrain.train.config import SECTIONS

    out = []
    for section, klass in SECTIONS.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            if tp is float or float in typing.get_args(tp):
                out.append((section, f.name))
    return out


FLOAT_FIELDS = _float_fields()
# fields where +inf reads as "no limit"; any other float field must reject it
INF_MEANS_NO_LIMIT = {"clip"}


def test_the_float_fields_are_found():
    names = {name for _, name in FLOAT_FIELDS}
    assert {"lr", "min_lr_fraction", "weight_decay", "beta1", "beta2", "clip", "dropout", "val_fraction",
            "max_seconds", "peak_tflops"} <= names


@pytest.mark.parametrize("section, name", FLOAT_FIELDS, ids=[n for _, n in FLOAT_FIELDS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_float_options_reject_non_finite_values(section, name, value):
    flag = "--" + name.replace("_", "-")
    if value == float("inf") and name in INF_MEANS_NO_LIMIT:
        assert getattr(getattr(resolve_config({name: value}), section), name) == value
    else:
        with pytest.raises(UserError) as e:
            resolve_config({name: value})
        message = str(e.value)
        assert message.startswith(flag + " ") and "\n" not in message, message


@pytest.mark.parametrize("section, name", FLOAT_FIELDS, ids=[n for _, n in FLOAT_FIELDS])
def test_non_finite_values_from_config_files_name_the_flag(tmp_path, section, name):
    (tmp_path / "c.toml").write_text(f"[{section}]\n{name} = nan\n")
    (tmp_path / "c.json").write_text(f'{{"{name}": NaN}}')
    flag = "--" + name.replace("_", "-")
    for path in (tmp_path / "c.toml", tmp_path / "c.json"):
        with pytest.raises(UserError, match=f"^{flag} must be a finite number"):
            resolve_config({}, read_config_file(path))


def test_toml_falls_back_to_tomli(tmp_path, monkeypatch):
    import sys

    import tomllib

    (tmp_path / "c.toml").write_text("lr = 0.01\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # the backport has the same API
    assert read_config_file(tmp_path / "c.toml") == {"lr": 0.01}


def test_toml_without_tomllib_or_tomli_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    (tmp_path / "c.toml").write_text("lr = 0.01\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(UserError, match=r"--config .*c\.toml: reading TOML needs Python 3\.11\+ or the tomli package"):
        read_config_file(tmp_path / "c.toml")
