"""`sftmix-ray` entry point: parse -> build config -> run a stage -> exit with a status."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from sftmix_ray.errors import SftmixError

STAGE_HELP = {
    "prepare": "validate, template and tokenize the corpus into OUT/data (Ray Data)",
    "reference": "train the reference model with NTP, keeping T checkpoints (Ray Train)",
    "score": "score every example's confidence with each reference checkpoint (Ray Data)",
    "split": "split the corpus into confident and unconfident halves",
    "train": "train the base model with SFTMix, or NTP with mixup.mu=0 (Ray Train)",
    "eval": "held-out response NLL, perplexity and exact match",
    "tune": "sweep mixup.alpha, mixup.mu and split.ratio with Ray Tune",
    "pipeline": "run prepare -> reference -> score -> split -> train -> eval",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set mixup.alpha=0.5 (repeatable)",
    )
    p.add_argument(
        "--output-dir", metavar="DIR", default="out", help="stage outputs (default: out)"
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per stage plus validate-data."""
    parser = argparse.ArgumentParser(
        prog="sftmix-ray", description="SFTMix instruction tuning on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        stage = sub.add_parser(name, help=text, description=text)
        _add_common(stage)
        if name == "pipeline":
            stage.add_argument(
                "--force", metavar="STAGE", help="rerun STAGE and every stage after it"
            )
    v = sub.add_parser(
        "validate-data",
        help="count valid and rejected rows of a corpus file, with reasons",
        description="Count valid and rejected rows of a corpus file, with reasons.",
    )
    v.add_argument("--data", required=True, metavar="FILE", help="JSON, JSONL, Parquet or HF id")
    v.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages"])
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _validate_data(args: argparse.Namespace) -> int:
    from sftmix_ray.data.validation import format_report, validate_file

    _, report = validate_file(args.data, args.format)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report, args.data))
    return 0


def _run(args: argparse.Namespace) -> int:
    from sftmix_ray.config import load_config
    from sftmix_ray.pipeline import run_pipeline, run_stage

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    out = Path(args.output_dir)
    # Ray prints raylet and worker messages to sys.stdout; they go to stderr, so stdout holds
    # only the result JSON (`sftmix-ray train ... > result.json`).
    with contextlib.redirect_stdout(sys.stderr):
        if args.command == "pipeline":
            result = run_pipeline(cfg, out, force=args.force)
        elif args.command == "tune":
            from tuning.sweep import run_tune

            result = run_tune(cfg, out)
        else:
            result = run_stage(args.command, cfg, out)
    print(json.dumps({args.command: _brief(result)}, indent=2, default=str))
    return 0


def _brief(result: object) -> object:
    """The result without long per-row lists, for the console."""
    if isinstance(result, dict):
        return {k: _brief(v) for k, v in result.items() if k != "rejections"}
    return result


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C so that stages record it and Ray shuts down cleanly."""


_SIGNALS: list[int] = []  # what stopped the run; libraries may re-raise a plain Ctrl+C


def _on_sigterm(signum: int, frame: object) -> None:
    _SIGNALS.append(signum)
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "validate-data":
            return _validate_data(args)
        return _run(args)
    except (SftmixError, OSError) as exc:
        # OSError: a full disk, a vanished mount, a file we may not write, anywhere in a stage.
        if args.debug:
            raise
        print(f"sftmix-ray {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # Finished stages and checkpoints stay; rerunning the same command goes on from there.
        terminated = isinstance(exc, Terminated) or signal.SIGTERM in _SIGNALS
        name = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"sftmix-ray {args.command}: {name}; rerun to resume", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _describe(exc: BaseException) -> str:
    """One line for the user: our errors as they are, OS errors with errno text and path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror} ({type(exc).__name__})"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
