"""The command line's help and messages: every option documented with its default, errors that say the fix."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from timm_ood.cli import _demo_model_notice, _HelpFormatter, build_parser, main
from timm_ood.evaluation import evaluate_loaders, grid_search
from timm_ood.reference import FAST_RECIPE

from ._models import batches, create, digits_split, noise_images, trained


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return {"timm-ood": parser, **parser.commands}


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", list(_commands()))
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = _commands()[command]
    formatter = _HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"timm-ood {command} {name} has no help text"
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.required or flag:
            continue
        # a default is shown as "(default: X)"; a None default says in words what happens without the option
        assert "default" in formatter._get_help_string(action), (
            f"timm-ood {command} {name}: its help does not say its default ({action.default!r})")


def test_help_shows_the_real_defaults() -> None:
    commands = _commands()
    train = _flat(commands["train"].format_help())
    assert "--batch-size N images per batch (default: 128)" in train and "256" not in train
    assert "--epochs N passes over the training images (default: 2)" in train
    assert "(default: None)" not in train
    assert "(default: 256)" in _flat(commands["eval"].format_help())
    assert "(default: all)" in _flat(commands["list"].format_help())
    assert "(default: 0)" in _flat(commands["demo"].format_help())  # --seeds: shown as typed, parsed to [0]
    assert build_parser().parse_args(["demo"]).seeds == [0]
    assert build_parser().parse_args(["fit", "--detector", "knn", "--id-train", "x", "--out", "o"]).detector_args == {}
    for command, parser in commands.items():
        assert "(default: None)" not in _flat(parser.format_help()), command


def test_an_option_of_another_command_names_that_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--epochs", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: timm-ood eval ")  # the sub-command's usage, not the top-level one
    last = err.strip().splitlines()[-1]
    assert last.startswith("timm-ood eval: error: unrecognized arguments: --epochs 3")
    assert "--epochs is an option of `timm-ood train`, not of eval" in last
    with pytest.raises(SystemExit):
        main(["train", "--model", "m", "--out", "o", "--cache-dir", "d"])
    assert "--cache-dir is an option of `timm-ood eval` and `timm-ood fit`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--no-such-option"])
    assert "timm-ood tune --help lists its options" in capsys.readouterr().err


def test_train_with_an_unknown_model_suggests_close_names(capsys, tmp_path, monkeypatch) -> None:
    import datasets

    import timm_ood.data

    tiny = datasets.Dataset.from_dict({"label": [0, 1, 2]})  # the model is made before any image is read
    monkeypatch.setattr(timm_ood.data, "load_source", lambda name, split: tiny)
    assert main(["train", "--model", "resnet81", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timm has no model 'resnet81'; did you mean resnet18" in err


@pytest.mark.parametrize("content", [b"not a checkpoint at all " * 40, b"", "pickle"])
def test_a_file_that_is_not_a_checkpoint_gives_one_line(capsys, tmp_path, content) -> None:
    path = tmp_path / "model.pth"
    if content == "pickle":
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"'{path}' is not a safetensors checkpoint" in err and "`timm-ood train --out FILE`" in err
    assert "--weights FILE" in err


def test_a_safetensors_file_without_our_metadata_gives_one_line(capsys, tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "state.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{path}' is a safetensors file without timm-ood's metadata" in err
    assert "`timm-ood train --out FILE`" in err and "--model NAME --weights FILE" in err


def _evaluate(model: torch.nn.Module):
    images, labels = digits_split()["test"]
    return evaluate_loaders(model, ["msp"], id_data=batches(images, labels),
                            ood_data={"noise": [(noise_images(100), None)]}, progress=False)


def test_evaluate_warns_when_id_accuracy_is_near_chance() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"ID accuracy is \d+\.\d%, near chance \(10\.0% for 10 classes\): the "
                                         r"model is untrained or not the checkpoint"):
        results = _evaluate(create("test_resnet").eval())
    assert results.accuracy <= 0.2
    # labels the model has no class for are named as the cause
    images, labels = digits_split()["test"]
    with pytest.warns(UserWarning, match=r"the ID labels go up to 9 but the model has 5 classes"):
        evaluate_loaders(create("test_resnet", num_classes=5).eval(), ["msp"], id_data=batches(images, labels),
                         ood_data={"noise": [(noise_images(50), None)]}, progress=False)


def test_evaluate_does_not_warn_on_a_trained_model() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _evaluate(trained())
    assert results.accuracy > 0.5
    assert not [w for w in caught if "near chance" in str(w.message)]


def test_tuning_progress_bars_name_the_sets_as_users_know_them(monkeypatch) -> None:
    import tqdm.auto

    import timm_ood.evaluation.tuning
    import timm_ood.passes

    shown: list[str] = []

    def recording(*args, **kwargs):
        shown.append(kwargs.get("desc", ""))
        return tqdm.auto.tqdm(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(timm_ood.passes, "tqdm", recording)
    monkeypatch.setattr(timm_ood.evaluation.tuning, "tqdm", recording)
    images, labels = digits_split()["test"]
    model = trained()
    sets = dict(id_data=batches(images[:40], labels[:40], 20), ood_data={"noise": [(noise_images(20), None)]})
    grid_search(model, "odin", space={"temperature": [1.0], "epsilon": [0.0]}, **sets)  # ODIN's own grid pass
    grid_search(model, "energy", space={"temperature": [1.0, 2.0]}, **sets)  # one forward serves the grid
    grid_search(model, "odin", space={"epsilon": [0.0]}, fixed={"temperature": 1.0}, **sets)  # scored per point
    assert shown and not [desc for desc in shown if "__" in desc]
    assert {"ODIN grid on held-out ID", "ODIN grid on held-out noise", "model outputs on held-out ID",
            "energy grid", "odin: score held-out noise"} <= set(shown)


def test_calibration_progress_bar_is_user_facing(monkeypatch) -> None:
    import tqdm.auto

    import timm_ood
    import timm_ood.passes

    shown: list[str] = []
    monkeypatch.setattr(timm_ood.passes, "tqdm",
                        lambda *a, **k: shown.append(k.get("desc", "")) or tqdm.auto.tqdm(*a, **{**k, "disable": True}))
    images, labels = digits_split()["test"]
    timm_ood.wrap(trained(), "msp").calibrate(batches(images[:40], labels[:40], 20), tpr=0.95)
    assert shown == ["calibrate the threshold on ID images"]


def test_demo_says_what_it_trains_how_long_and_where_it_is_cached(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    first = _demo_model_notice(FAST_RECIPE, path, cached=False, fast=True)
    assert first.startswith(f"seed 0: training {FAST_RECIPE.architecture} on fashion-mnist for 1 epoch (seconds)")
    assert f"the model is cached at {path}" in first
    full = _demo_model_notice(FAST_RECIPE, path, cached=False, fast=False)
    assert "about 12 minutes on 2 CPU cores" in full
    cached = _demo_model_notice(FAST_RECIPE, path, cached=True, fast=False)
    assert cached.startswith(f"seed 0: using the cached {FAST_RECIPE.architecture} at {path}")
    assert "--retrain" in cached


@pytest.mark.slow
def test_demo_announces_its_plan(tmp_path, capsys, data_fashion_mnist) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("timm-ood demo: a tiny stand-in model (--fast), test_resnet trained on fashion-mnist")
    assert lines[0].endswith(f"report written to {out}")
    model_line = next(line for line in lines if line.startswith("seed 0: "))
    assert ".safetensors" in model_line
    assert "(seconds)" in model_line or "using the cached" in model_line
    assert any(line.startswith("seed 0: evaluating 7 detectors") for line in lines)
