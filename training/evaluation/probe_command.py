"""`refvlm probe towers|refs|choice`: the stage probes of refvlm_training.evaluation.probes, as
JSON reports; heavy imports happen in the handlers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

_EPILOG = """\
examples:
  refvlm probe towers --model models/nano --out probe-towers.json
  refvlm probe towers --towers runs/nano/stage0/model --preset nano
  refvlm probe refs --model models/nano --data simworld:test:40 --out probe-refs.json
  refvlm probe choice --model models/nano --data shards/nano-test --limit 150"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe", help="measure a stage before training the next: tower linear probes, <REF> spread, choice",
        description="Probes of one stage's outputs, computed once: per-object linear probes of the vision "
        "towers (colour, shape, material, size; held-out colour x shape pairs), and the spread of the "
        "<REF> states before and after the decoders' input normalisation, and whether an objects decoder's "
        "misses are targets no proposal covers or wrong choices.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="probe_command", metavar="PROBE")
    commands.required = True

    towers = commands.add_parser("towers", help="per-object linear probes of the vision towers on SimWorld")
    source = towers.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="M", help="model folder, or a preset name (towers as built)")
    source.add_argument("--towers", metavar="DIR", help="stage 0 output folder (vit/convnext.safetensors)")
    towers.add_argument("--preset", default="nano", help="preset whose towers --towers holds (default nano)")
    towers.add_argument("--train-scenes", type=int, default=300, help="train-split scenes the probes fit on")
    towers.add_argument("--new-train-scenes", type=int, default=100, help="other train-split scenes to score")
    towers.add_argument("--test-scenes", type=int, default=100, help="test-split scenes to score")
    towers.add_argument("--size", default="256x192", help="render size WxH (default 256x192)")
    towers.add_argument("--out", metavar="FILE", default="probe-towers.json", help="JSON report")
    towers.set_defaults(func=_towers)

    refs = commands.add_parser("refs", help="spread of the teacher-forced <REF> states, raw and normalised")
    _sample_arguments(refs, "model folder, or a preset name", "whose decoder input normalisation to apply")
    refs.add_argument("--fit-data", default=None, metavar="D",
                      help="also standardise the states by the statistics of these samples' states (e.g. "
                      "simworld:train:40): what ref_norm: standard would give this model")
    refs.add_argument("--out", metavar="FILE", default="probe-refs.json", help="JSON report")
    refs.set_defaults(func=_refs)

    choice = commands.add_parser("choice", help="an objects decoder's answers: target found by a proposal vs chosen")
    _sample_arguments(choice, "model folder with 'objects' decoders", "whose decoder's choice")
    choice.add_argument("--out", metavar="FILE", default="probe-choice.json", help="JSON report")
    choice.set_defaults(func=_choice)


def _sample_arguments(parser: argparse.ArgumentParser, model_help: str, unit_help: str) -> None:
    """--model, --data, --task, --limit and --unit of the probes on teacher-forced <REF> states."""
    parser.add_argument("--model", required=True, metavar="M", help=model_help)
    parser.add_argument("--data", default="simworld:test:40", metavar="D",
                        help="shard folder or simworld:SPLIT:N (default simworld:test:40)")
    parser.add_argument("--task", default="rec", help="only samples of this task (default rec; 'all': every task)")
    parser.add_argument("--limit", type=int, default=200, help="at most this many samples (default 200)")
    parser.add_argument("--unit", default="box", help=f"{unit_help} (default box)")


def _load_model(name: str):
    from refvlm_core.config import PRESET_NAMES, preset
    from refvlm_core.errors import InputError

    if name in PRESET_NAMES:
        from refvlm_core.model import RefVLM
        return RefVLM.from_config(preset(name))
    if not Path(name).is_dir():
        raise InputError(f"--model {name}: no such model folder and not a preset ({', '.join(PRESET_NAMES)})")
    from refvlm_core.checkpoint import load_model
    return load_model(name)


def _towers(args: argparse.Namespace) -> int:
    from refvlm_core.errors import InputError
    from refvlm_core.geometry import parse_size
    from refvlm_training.evaluation.probes import tower_probes

    width, height = parse_size(args.size)
    if min(args.train_scenes, args.new_train_scenes, args.test_scenes) < 1:
        raise InputError("--train-scenes, --new-train-scenes and --test-scenes must each be at least 1")
    encoder = _stage0_encoder(args.towers, args.preset) if args.towers else _load_model(args.model).encoder
    report = tower_probes(encoder, args.train_scenes, args.new_train_scenes, args.test_scenes, width, height,
                          progress=True)
    report["source"] = args.towers or args.model
    _write(report, args.out)
    for kind in [k for k in ("mean", "grid", "pathways") if k in report]:
        print(f"{kind:>8}: " + "  ".join(f"{name} {row['test']:.2f}" for name, row in report[kind].items())
              + f"  shape on held-out pairs {report[kind]['shape']['test_held_out']}")
    return 0


def _stage0_encoder(folder: str, preset_name: str):
    from refvlm_core.config import preset
    from refvlm_core.encoders import DualImageEncoder
    from refvlm_core.errors import InputError

    root = Path(folder)
    files = {name: root / f"{name}.safetensors" for name in ("vit", "convnext")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"--towers {folder}: missing {', '.join(missing)}; pass a stage 0 output's model/ folder")
    vision = preset(preset_name).vision
    vision.vit_weights, vision.convnext_weights = str(files["vit"]), str(files["convnext"])
    return DualImageEncoder(vision)


def _model_and_samples(args: argparse.Namespace) -> tuple:
    """The --model with a decoder for --unit, and the first --limit samples of --task in --data."""
    from refvlm_core.errors import InputError

    model = _load_model(args.model)
    if args.unit not in model.decoders:
        raise InputError(f"--unit {args.unit}: the model's units are {sorted(model.decoders)}")
    samples = _task_samples(args.data, args.task, args.limit)
    if not samples:
        raise InputError(f"--data {args.data} has no {args.task} samples")
    return model, samples


def _refs(args: argparse.Namespace) -> int:
    from refvlm_training.evaluation.probes import ref_spread

    model, samples = _model_and_samples(args)
    fit = None
    if args.fit_data:
        fit = _task_samples(args.fit_data, args.task, args.limit)
    report = ref_spread(model, samples, args.unit, fit, progress=True)
    report.update(source=args.model, data=args.data, task=args.task, fit_data=args.fit_data)
    _write(report, args.out)
    print(f"{report['refs']} <REF> states, {report['phrases']} phrases: mean pairwise cosine "
          f"{report['raw']['mean_pairwise_cosine']} raw, {report['normalised']['mean_pairwise_cosine']} "
          f"after the {args.unit} decoder's {report['ref_norm']} normalisation"
          + (f", {report['standardised']['mean_pairwise_cosine']} standardised" if fit else ""))
    return 0


def _choice(args: argparse.Namespace) -> int:
    from refvlm_core.errors import InputError
    from refvlm_training.evaluation.probes import choice_probe

    model, samples = _model_and_samples(args)
    try:
        report = choice_probe(model, samples, args.unit, progress=True)
    except ValueError as error:
        raise InputError(f"--model {args.model}: {error}") from error
    report.update(source=args.model, data=args.data, task=args.task)
    _write(report, args.out)
    print(f"{report['count']} targets: a proposal covers {report['covered']:.0%}, the chosen one "
          f"{report['chosen_hit']:.0%}, the best-covering one is chosen for {report['best_chosen']:.0%}")
    return 0


def _task_samples(data: str, task: str, limit: int) -> list:
    """The first ``limit`` samples of ``task`` ("all": any), reading no further shards than needed."""
    from itertools import islice

    from refvlm_training.evaluation.runner import load_samples

    return list(islice((s for s in load_samples(data) if task == "all" or s.task == task), limit))


def _write(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")
