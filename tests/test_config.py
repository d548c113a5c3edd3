"""Config: flags from dataclasses, precedence file < flags, validation messages naming the flag."""

import argparse
import json

import pytest

from streamtrain.config import (
    RunConfig,
    add_flags,
    flag_values,
    parse_synthetic,
    read_config_file,
    resolve_config,
    write_config,
)
from streamtrain.errors import UserError


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
