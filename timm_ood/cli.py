"""The ``timm-ood`` command line: list, train, eval, tune, demo.

::

    timm-ood list
    timm-ood train --model resnet18 --data fashion-mnist --epochs 5 --out ckpt.safetensors
    timm-ood eval  --model resnet18 --checkpoint ckpt.safetensors --detectors msp,odin,energy --benchmark fashion-mnist --out report/
    timm-ood eval  --model convnext_tiny.fb_in22k_ft_in1k --benchmark openood-imagenet1k --detectors msp,energy,knn,vim
    timm-ood eval  --model resnet50.a1_in1k --weights resnet50.safetensors --id-train ./train --id-test ./val \
                   --ood textures=./dtd --ood my-org/my-outliers:test --out report/
    timm-ood fit   --model resnet50.a1_in1k --detector vim --id-train imagenet-1k:train --calibrate-tpr 0.95 --out vim/
    timm-ood tune  --model resnet18 --checkpoint ckpt.safetensors --detector odin --benchmark fashion-mnist
    timm-ood demo  # the offline default, end to end
    torchrun --nproc-per-node 2 -m timm_ood.cli eval --checkpoint ckpt.safetensors --detectors all --cache-dir ~/.cache/timm-ood/outputs

Errors print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["main"]

EXIT_ERROR = 2


def _whole_number_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _whole_number_at_least(1)
_non_negative_int = _whole_number_at_least(0)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], e.g. 0.95, got {text}")
    return value


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated detector names such as msp,energy, got {text!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"{', '.join(duplicates)} listed twice; name each detector once")
    return names


def _command_line(argv: Sequence[str]) -> str:
    return "timm-ood " + " ".join(shlex.quote(a) for a in argv)


# -- list -------------------------------------------------------------------
def _list(args: argparse.Namespace) -> None:
    import timm_ood
    from timm_ood import data
    from timm_ood.evaluation.results import markdown_table

    if args.what in ("detectors", "all"):
        registrations = timm_ood.detectors.detector_registrations()
        rows = [[name, r.distribution, r.obj.paper] for name, r in registrations.items()]
        print("Detectors:\n\n" + markdown_table(["name", "from", "paper"], rows) + "\n")
    if args.what in ("sources", "all"):
        rows = [[name, "offline" if s.offline else "hub", s.description] for name, s in data.list_sources().items()]
        print("Sources:\n\n" + markdown_table(["name", "where", "what"], rows) + "\n")
    if args.what in ("benchmarks", "all"):
        def where(ref: data.SourceRef) -> str:
            spec = data.get_source(ref.source)
            hub_splits = getattr(spec.load, "hub_splits", None)  # OpenOOD sets: splits their hub copy serves
            hub = spec.hub_id if hub_splits is None or ref.split in hub_splits else None
            return f"{ref.source}:{ref.split} ({hub or ('offline' if spec.offline else 'local copy only')})"

        def ood_sets(b: data.BenchmarkSpec) -> str:
            grouped = {s for members in b.groups.values() for s in members}
            parts = [f"{group}: " + ", ".join(f"{s} = {where(b.ood[s])}" for s in members)
                     for group, members in b.groups.items()]
            rest = [s for s in b.ood if s not in grouped]
            if rest:
                parts.append(", ".join(rest if not b.groups else (f"{s} = {where(b.ood[s])}" for s in rest)))
            if b.validation_ood:
                parts.append("tuning: " + ", ".join(f"{s} = {where(r)}" for s, r in b.validation_ood.items()))
            if b.full_spectrum:
                parts.append("full-spectrum: " + ", ".join(b.full_spectrum))
            return "; ".join(parts)

        rows = [[name, "offline" if b.offline else "hub", ood_sets(b), b.description]
                for name, b in data.list_benchmarks().items()]
        print("Benchmarks:\n\n" + markdown_table(["name", "where", "OOD sets", "what"], rows))


# -- train ------------------------------------------------------------------
def _train(args: argparse.Namespace) -> None:
    from timm_ood.reference import Recipe, train_on_source
    from timm_ood.training import save_checkpoint

    recipe = Recipe(architecture=args.model, source=args.data, epochs=args.epochs, batch_size=args.batch_size,
                    optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, augment=args.augment,
                    seed=args.seed, train_images=args.max_images, min_accuracy=0.0)
    model, accuracy = train_on_source(recipe, progress=not args.quiet)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out, metadata={"arguments": vars(args), "test_accuracy": accuracy})
    print(f"{args.model} on {args.data}: test accuracy {100 * accuracy:.2f}%; saved {args.out}")


def _device(name: str) -> str:
    """``auto``: this process's GPU under torchrun (``LOCAL_RANK``), else the first GPU, else the CPU."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


@contextmanager
def _process_group(device: str) -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join its process group: NCCL on GPUs, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _say(*lines: str) -> None:
    """Print on rank 0 only: under torchrun every rank computes, one reports."""
    from timm_ood.distributed import is_main_process

    if is_main_process():
        print(*lines, flush=True)


def _load_model(args: argparse.Namespace):
    """The timm model: a ``timm-ood train`` checkpoint, a local weights file, or the tag's pretrained weights."""
    from timm_ood.timm_models import create_timm_model
    from timm_ood.training import load_checkpoint

    if args.checkpoint is not None:
        if args.weights is not None:
            raise ValueError("give --checkpoint (a `timm-ood train` checkpoint) or --weights (a timm state dict for "
                             "--model), not both")
        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(
                f"checkpoint {args.checkpoint!r} not found; make one with `timm-ood train ... --out`")
        model = load_checkpoint(args.checkpoint, args.model)
    elif args.model is None:
        raise ValueError("name the model: --model resnet50.a1_in1k (a timm name with its pretrained tag; "
                         "--weights FILE for a local copy of its weights), or --checkpoint FILE from `timm-ood train`")
    else:
        model = create_timm_model(args.model, pretrained=True, weights=args.weights)
    return model.to(_device(args.device))


def _own_data(args: argparse.Namespace) -> bool:
    return bool(args.id_test or args.ood or args.id_train)


def _source_paths(args: argparse.Namespace) -> dict[str, str]:
    """``--source-path SOURCE=PATH``: registered sources read from local copies, by name."""
    from timm_ood.data.arguments import split_named

    return dict(split_named(text, "--source-path", "SOURCE=PATH", "--source-path textures=./dtd")
                for text in args.source_path or [])


def _benchmark(args: argparse.Namespace):
    """The benchmark to evaluate: its name, or the loaded one when sources are read from local copies."""
    from timm_ood.data import load_benchmark

    name = args.benchmark or "fashion-mnist"
    paths = _source_paths(args)
    return load_benchmark(name, source_params={n: {"path": p} for n, p in paths.items()}) if paths else name


# -- eval -------------------------------------------------------------------
def _eval(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from timm_ood.data import load_data
    from timm_ood.data.arguments import parse_data_argument, parse_named_data_argument
    from timm_ood.distributed import is_main_process
    from timm_ood.evaluation import evaluate

    detectors = "all" if args.detectors == ["all"] else args.detectors
    common = dict(batch_size=args.batch_size, tpr=args.tpr, positive=args.positive, max_images=args.max_images,
                  max_fit_images=args.max_fit_images, num_workers=args.workers,
                  progress=not args.quiet and is_main_process(), cache_dir=args.cache_dir)
    if _own_data(args):
        if args.benchmark is not None or args.full_spectrum:
            raise ValueError("give --benchmark (with --full-spectrum) or your own data (--id-test, --ood, "
                             "--id-train), not both")
        named = [parse_named_data_argument(text) for text in args.ood or []]
        if not args.id_test or not named:
            raise ValueError("your own data needs --id-test DATA and at least one --ood NAME=DATA (--id-train DATA "
                             "too for detectors that fit)")
        duplicates = sorted({name for name, _ in named if [n for n, _ in named].count(name) > 1})
        if duplicates:
            raise ValueError(f"--ood names {', '.join(duplicates)} twice; give each OOD set its own name")
        paths = _source_paths(args)
        id_test = parse_data_argument(args.id_test)  # every argument checked before the model is made
        id_train = None if args.id_train is None else parse_data_argument(args.id_train)
        model = _load_model(args)
        results = evaluate(model, detectors, id_data=load_data(id_test, "test", source_paths=paths),
                           ood_data={name: load_data(data, "ood", source_paths=paths) for name, data in named},
                           fit_data=None if id_train is None else load_data(id_train, "train", source_paths=paths),
                           **common)
    else:
        benchmark = _benchmark(args)
        results = evaluate(_load_model(args), detectors, benchmark, full_spectrum=args.full_spectrum, **common)
    _say(results.table())
    if args.out and is_main_process():
        results.save(args.out, plots=not args.no_plots, command=_command_line(argv))
        print(f"\nreport written to {args.out}")


# -- tune -------------------------------------------------------------------
def _tune(args: argparse.Namespace) -> None:
    from timm_ood.distributed import is_main_process
    from timm_ood.evaluation import tune

    result = tune(_load_model(args), args.detector, _benchmark(args), protocol=args.protocol, criterion=args.criterion,
                  tpr=args.tpr,
                  batch_size=args.batch_size, max_images=args.max_images, num_workers=args.workers,
                  progress=not args.quiet and is_main_process())
    _say(result.table())
    _say(f"\nbest on average over the sets: {result.best_average} ({result.seconds:.1f} s)")
    if args.out and is_main_process():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"detector": result.detector, "best": result.best,
                                              "best_average": result.best_average, "cross": result.cross,
                                              "criterion": result.criterion}, indent=2) + "\n")


# -- fit --------------------------------------------------------------------
def _detector_arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"k\": 10}}', got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"k\": 10}}', got {text!r}")
    return value


def _fit(args: argparse.Namespace) -> None:
    import torch

    from timm_ood import create_model, wrap
    from timm_ood.data import load_data, make_loader
    from timm_ood.data.arguments import parse_data_argument
    from timm_ood.distributed import is_main_process

    paths = _source_paths(args)
    id_train = parse_data_argument(args.id_train)  # checked before the model is made
    id_val = None if args.id_val is None else parse_data_argument(args.id_val)
    if args.checkpoint is None and args.model is not None:
        ood = create_model(args.model, args.detector, args.detector_args, pretrained=True, weights=args.weights)
        ood.to(_device(args.device))
    else:
        ood = wrap(_load_model(args), args.detector, **args.detector_args)
    model = ood.model
    train = load_data(id_train, "train", source_paths=paths)
    calibration = None
    if args.calibrate_tpr is not None:
        if id_val is not None:
            calibration = load_data(id_val, "test", source_paths=paths)
        else:  # hold out images of the training data: a threshold is never read on the images fitted on
            held_out = min(args.calibration_images, len(train) // 2)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).numpy()
            calibration = train.select(sorted(order[:held_out]))
            train = train.select(sorted(order[held_out:]))
    if args.max_fit_images is not None and len(train) > args.max_fit_images:
        train = train.select(range(args.max_fit_images))
    progress = not args.quiet and is_main_process()
    loader = dict(batch_size=args.batch_size, num_workers=args.workers)
    ood.fit(make_loader(train, model, name="id_train", **loader), progress=progress, cache_dir=args.cache_dir)
    if calibration is not None:
        threshold = ood.calibrate(make_loader(calibration, model, name="id_calibration", **loader),
                                  tpr=args.calibrate_tpr, progress=progress)
        _say(f"threshold {threshold:.6g}: accepts {100 * args.calibrate_tpr:g}% of {len(calibration)} held-out "
             "in-distribution images")
    if is_main_process():
        ood.save_pretrained(args.out)
        print(f"{args.detector} on {args.model or args.checkpoint}, fitted on {len(train)} images; saved to "
              f"{args.out} (load it with timm_ood.from_pretrained({args.out!r}))")


# -- demo -------------------------------------------------------------------
def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


#: how long the demo's steps take on 2 CPU cores (README.md), by --fast
_DEMO_TRAINING_TIME = {False: "about 12 minutes on 2 CPU cores", True: "seconds"}
_DEMO_EVALUATION_TIME = {False: "about 2 minutes on 2 CPU cores", True: "seconds"}


def _demo_plan(args: argparse.Namespace, recipe, detectors: Sequence[str]) -> str:
    """The demo's first line: what it is about to do, for how many seeds, and where the report goes."""
    seeds = ("seeds " if len(args.seeds) > 1 else "seed ") + ", ".join(str(seed) for seed in args.seeds)
    model = "a tiny stand-in model (--fast)" if args.fast else "the reference model"
    return (f"timm-ood demo: {model}, {recipe.architecture} trained on {recipe.source} ({seeds}; trained once, "
            f"then read from the cache), scored by {len(detectors)} detectors "
            f"({', '.join(detectors)}) on Fashion-MNIST's test images against the offline OOD sets; "
            f"report written to {args.out}")


def _demo_model_notice(recipe, path: Path, *, cached: bool, fast: bool) -> str:
    """Where the seed's model comes from: the cache (its path), or training now (how long, and where it is kept)."""
    if cached:
        return (f"seed {recipe.seed}: using the cached {recipe.architecture} at {path} (--retrain trains it again, "
                f"{_DEMO_TRAINING_TIME[fast]})")
    return (f"seed {recipe.seed}: training {recipe.architecture} on {recipe.source} for {recipe.epochs} "
            f"epoch{'s' if recipe.epochs > 1 else ''} ({_DEMO_TRAINING_TIME[fast]}); the model is cached at {path}, "
            "so later runs skip this step")


def _demo(args: argparse.Namespace, argv: Sequence[str]) -> None:
    import dataclasses

    from timm_ood.evaluation import DEFAULT_DETECTORS, evaluate
    from timm_ood.evaluation.seeds import SeededResults, compare_with_reference
    from timm_ood.reference import (
        FAST_RECIPE,
        RECIPE,
        RECORDED_RESULTS,
        checkpoint_path,
        record_results,
        recorded_results,
        reference_model,
    )
    from timm_ood.training import read_checkpoint_metadata

    if args.record_reference and len(args.seeds) < 2:
        raise ValueError("--record-reference needs at least two --seeds (e.g. --seeds 0,1,2): one run has no spread")
    base = FAST_RECIPE if args.fast else RECIPE
    print(_demo_plan(args, base, DEFAULT_DETECTORS), flush=True)
    runs = {}
    for seed in args.seeds:
        recipe = dataclasses.replace(base, seed=seed)
        path = checkpoint_path(recipe)
        print(_demo_model_notice(recipe, path, cached=path.exists() and not args.retrain, fast=args.fast),
              flush=True)
        model = reference_model(recipe, retrain=args.retrain, progress=not args.quiet)
        print(f"seed {seed}: evaluating {len(DEFAULT_DETECTORS)} detectors on fashion-mnist "
              f"({_DEMO_EVALUATION_TIME[args.fast]})", flush=True)
        trained_on = read_checkpoint_metadata(path)["metadata"].get("numerics")
        runs[seed] = evaluate(model, DEFAULT_DETECTORS, "fashion-mnist", batch_size=args.batch_size,
                              max_images=500 if args.fast else None,
                              max_fit_images=2000 if args.fast else None, progress=not args.quiet)
        if trained_on:
            runs[seed].settings["trained_on"] = trained_on
            runs[seed].notes.append("Model trained with: " + ", ".join(f"{k} {v}" for k, v in trained_on.items())
                                    + " (what decides its bits besides the seed: docs/reproducibility.md).")
    command = _command_line(argv)
    if len(runs) == 1:
        (run,) = runs.values()
        reference = recorded_results(base)
        if reference is not None:
            run.notes.append(compare_with_reference(run, reference))
        print(run.table())
        run.save(args.out, command=command)
    else:
        seeded = SeededResults(runs)
        print(seeded.table())
        seeded.save(args.out, command=command)
        if args.record_reference:
            record_results(base, {"command": command, **seeded.reference_summary()})
            print(f"recorded the reference over seeds {args.seeds} in {RECORDED_RESULTS}")
    print(f"\nreport with plots written to {args.out}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``(default: X)``.

    A help that already says its default (``default`` in the text) is left as
    it is; so is a flag (default False) and an option whose default is None,
    whose help says in words what happens without it (``default: ...``).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose unrecognised arguments are reported by the sub-command they follow.

    ``timm-ood eval --epochs 3`` names the sub-command that has ``--epochs``
    and shows ``eval``'s usage, not the top-level one.
    """

    commands: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            commands = getattr(self, "commands", {})
            (commands.get(command) or self).error(_unrecognized(extras, command, commands))
        return parsed


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _unrecognized(extras: Sequence[str], command: str | None, commands: dict[str, argparse.ArgumentParser]) -> str:
    """``unrecognized arguments: --epochs 3; --epochs is an option of `timm-ood train`, not of eval``."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    hints = []
    for extra in extras:
        option = extra.split("=", 1)[0]
        if not option.startswith("-"):
            continue
        owners = [name for name, sub in commands.items() if name != command and option in _option_strings(sub)]
        if owners:
            hints.append(f"{option} is an option of {' and '.join(f'`timm-ood {n}`' for n in owners)}"
                         + (f", not of {command}" if command else ""))
    if hints:
        return message + "; " + "; ".join(hints)
    return message + (f" (timm-ood {command} --help lists its options)" if command else "")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``timm-ood`` (one sub-command per job); every option's help shows its default."""
    parser = _Parser(prog="timm-ood", description="Out-of-distribution detection for timm models.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)
        parser.commands[name] = sub
        return sub

    parser.commands = {}
    listing = command("list", "registered detectors, data sources and benchmarks")
    listing.add_argument("what", nargs="?", default="all", choices=("all", "detectors", "sources", "benchmarks"),
                         help="what to list")

    def common(sub: argparse.ArgumentParser, batch_size: int = 256) -> None:
        sub.add_argument("--batch-size", type=_positive_int, default=batch_size, metavar="N", help="images per batch")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    train = command("train", "train a timm model on an in-distribution source")
    train.add_argument("--model", required=True, metavar="NAME",
                       help="timm architecture, e.g. resnet18 (random initial weights)")
    train.add_argument("--data", default="fashion-mnist",
                       help="in-distribution source: trained on its train split, tested on its test split "
                            "(timm-ood list sources)")
    train.add_argument("--epochs", type=_positive_int, default=2, metavar="N", help="passes over the training images")
    train.add_argument("--optimizer", choices=("sgd", "adamw", "adam"), default="sgd",
                       help="sgd (Nesterov momentum 0.9), adamw or adam")
    train.add_argument("--lr", type=_positive_float, default=0.1,
                       help="peak learning rate of the cosine schedule (0.1 suits sgd; about 1e-3 for adamw and adam)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=5e-4, help="L2 weight decay")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="random 2-pixel shifts and flips")
    train.add_argument("--seed", type=int, default=0,
                       help="seeds the initial weights, the image order and the augmentation")
    train.add_argument("--max-images", type=_positive_int, default=None, metavar="N",
                       help="train on N images drawn with --seed (default: every training image)")
    train.add_argument("--out", required=True, metavar="FILE",
                       help="checkpoint to write (.safetensors; read back by --checkpoint FILE)")
    common(train, batch_size=128)

    def model_args(sub: argparse.ArgumentParser, *, benchmark: bool = True) -> None:
        sub.add_argument("--model", default=None, metavar="NAME",
                         help="timm model with its pretrained tag (resnet50.a1_in1k) or an hf_hub: id; with "
                              "--checkpoint the architecture (default: the checkpoint's)")
        sub.add_argument("--weights", default=None, metavar="FILE",
                         help="a local .safetensors/.pth state dict for --model, loaded through timm's "
                              "pretrained_cfg_overlay=dict(file=...) (default: the tag's pretrained weights, from "
                              "timm's cache or the hub; the tag's data config is kept either way)")
        sub.add_argument("--checkpoint", default=None, metavar="FILE",
                         help="a checkpoint written by `timm-ood train --out FILE` (default: none; --model names "
                              "the model)")
        if benchmark:
            sub.add_argument("--benchmark", default=None, metavar="NAME",
                             help="benchmark name (timm-ood list benchmarks; default: fashion-mnist)")
        sub.add_argument("--source-path", action="append", default=None, metavar="SOURCE=PATH",
                         help="read a registered source (of the benchmark, or named as DATA) from a local copy: an "
                              "image folder, parquet files, a save_to_disk folder; repeatable (default: each "
                              "source's own location)")
        sub.add_argument("--max-images", type=_positive_int, default=None, metavar="N",
                         help="at most N images per set (default: every image)")
        sub.add_argument("--device", default="auto",
                         help="cpu, cuda, cuda:1, ... (default: auto: this rank's GPU under torchrun, else a GPU if "
                              "there is one, else the CPU)")
        sub.add_argument("--workers", type=_non_negative_int, default=0, metavar="N",
                         help="DataLoader worker processes (0: load in the main process)")

    data_help = ("a source name (timm-ood list sources), a hub dataset id org/name, an image folder, parquet "
                 "files or a save_to_disk folder; optionally :split")

    evaluation = command("eval", "evaluate detectors on a benchmark or on your own data")
    model_args(evaluation)
    evaluation.add_argument("--id-train", default=None, metavar="DATA",
                            help=f"your in-distribution training data, for detectors that fit: {data_help} "
                                 "(default split: train)")
    evaluation.add_argument("--id-test", default=None, metavar="DATA",
                            help="your in-distribution test data (default split: test, else validation)")
    evaluation.add_argument("--ood", action="append", default=None, metavar="NAME=DATA",
                            help="an OOD set of yours, named; repeatable (e.g. --ood textures=./dtd; default: the "
                                 "benchmark's OOD sets)")
    evaluation.add_argument("--full-spectrum", action="store_true",
                            help="count the benchmark's covariate-shifted ID sets as in-distribution and report "
                                 "their accuracy (OpenOOD v1.5's full-spectrum setting)")
    evaluation.add_argument("--detectors", type=_names, default="msp,odin,energy,mahalanobis", metavar="NAMES",
                            help="comma-separated names, or 'all' (every post-hoc detector the model can serve)")
    evaluation.add_argument("--cache-dir", default=None, metavar="DIR",
                            help="feature store: the model's outputs for each set are computed once and read by every "
                                 "later run of the same model and data, e.g. ~/.cache/timm-ood/outputs (default: "
                                 "none, every run computes them)")
    evaluation.add_argument("--tpr", type=_rate, default=0.95,
                            help="the in-distribution true positive rate at which FPR@TPR and the detection error "
                                 "are read, in (0, 1]")
    evaluation.add_argument("--positive", choices=("id", "ood"), default="id",
                            help="which class the metrics count as positive: id (the papers' reading) or ood "
                                 "(OpenOOD's)")
    evaluation.add_argument("--max-fit-images", type=_positive_int, default=None, metavar="N",
                            help="fit detectors on at most N in-distribution training images (default: every one)")
    evaluation.add_argument("--out", default=None, metavar="FOLDER",
                            help="write markdown, JSON, CSV and plots here (default: print the table only)")
    evaluation.add_argument("--no-plots", action="store_true", help="with --out: skip the ROC and histogram plots")
    common(evaluation)

    tuning = command("tune", "tune a detector on the benchmark's held-out images (ODIN's protocol)")
    model_args(tuning)
    tuning.add_argument("--detector", default="odin", metavar="NAME",
                        help="a detector with a search space, e.g. odin, temperature, energy, react, knn")
    tuning.add_argument("--protocol", choices=("per-set", "cross-set"), default="per-set",
                        help="per-set: tune on each OOD set's held-out images; cross-set: also test each set's "
                             "choice on every other set's evaluation images")
    tuning.add_argument("--tpr", type=_rate, default=0.95,
                            help="the in-distribution true positive rate at which FPR@TPR and the detection error "
                                 "are read, in (0, 1]")
    tuning.add_argument("--criterion", choices=("fpr_at_tpr", "detection_error", "detection_error_at_tpr", "auroc"),
                        default="fpr_at_tpr",
                        help="what the held-out images minimise: FPR at --tpr (ODIN's), Lee et al.'s detection "
                             "error (its minimum over all thresholds), that error at the --tpr threshold, or 1 - AUROC")
    tuning.add_argument("--out", default=None, metavar="FILE",
                        help="write the chosen hyperparameters as JSON (default: print them only)")
    common(tuning)

    fitting = command("fit", "fit a detector on your in-distribution data, calibrate its threshold and save it "
                             "(save_pretrained folder)")
    model_args(fitting, benchmark=False)
    fitting.add_argument("--detector", required=True, metavar="NAME",
                         help="a registered detector (timm-ood list detectors)")
    fitting.add_argument("--detector-args", type=_detector_arguments, default="{}", metavar="JSON",
                         help='its hyperparameters as a JSON object, e.g. \'{"k": 50}\' (default: {}, its defaults)')
    fitting.add_argument("--id-train", required=True, metavar="DATA",
                         help=f"in-distribution training data: {data_help} (default split: train)")
    fitting.add_argument("--calibrate-tpr", type=_rate, default=None, metavar="TPR",
                         help="store the threshold that accepts this fraction of held-out ID images, e.g. 0.95 "
                              "(default: no threshold)")
    fitting.add_argument("--id-val", default=None, metavar="DATA",
                         help="held-out ID data to calibrate on (default: --calibration-images images held out of "
                              "--id-train, not fitted on)")
    fitting.add_argument("--calibration-images", type=_positive_int, default=5000, metavar="N",
                         help="images held out of --id-train for calibration when --id-val is not given "
                              "(at most half of them)")
    fitting.add_argument("--seed", type=int, default=0, help="seeds which images are held out")
    fitting.add_argument("--max-fit-images", type=_positive_int, default=None, metavar="N",
                         help="fit on at most N images (default: every one)")
    fitting.add_argument("--cache-dir", default=None, metavar="DIR",
                         help="feature store for the model's outputs (see eval; default: none)")
    fitting.add_argument("--out", required=True, metavar="FOLDER",
                         help="folder to write (detector.safetensors, config.json, README.md model card)")
    common(fitting)

    demo = command("demo", "the offline default end to end: reference model, evaluation, report")
    demo.add_argument("--out", default="report", metavar="FOLDER", help="report folder")
    demo.add_argument("--fast", action="store_true",
                      help="a tiny stand-in model and small sets (seconds, not the reference's minutes)")
    demo.add_argument("--retrain", action="store_true", help="train again, ignoring the cached reference model")
    demo.add_argument("--seeds", type=_seeds, default="0",
                      help="training seeds, comma-separated; several seeds report mean ± sd")
    demo.add_argument("--record-reference", action="store_true",
                      help="with several --seeds: store their means as the reference single runs are compared with")
    common(demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors: ``timm-ood: warning: ...``."""
    print(f"timm-ood: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``timm-ood``; returns the exit status."""
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    shown_as = warnings.showwarning
    if not args.debug:
        warnings.showwarning = _show_warning
    if getattr(args, "quiet", False):  # datasets' own bars too (building a folder's or parquet's split)
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    try:
        return _run(args, argv)
    finally:
        warnings.showwarning = shown_as


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        if args.command == "list":
            _list(args)
        elif args.command == "train":
            _train(args)
        elif args.command == "eval":
            with _process_group(_device(args.device)):
                _eval(args, argv)
        elif args.command == "tune":
            with _process_group(_device(args.device)):
                _tune(args)
        elif args.command == "fit":
            with _process_group(_device(args.device)):
                _fit(args)
        else:
            _demo(args, argv)
    except KeyboardInterrupt:
        print("timm-ood: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"timm-ood: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
