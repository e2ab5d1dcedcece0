"""`sftmix-ray` entry point: parse -> build config -> run a stage -> exit with a status."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import cast

# Nothing heavy at import: the console script points stdout away (`ResultStdout`) as the first
# thing `main` does, and everything imported before that runs with the real stdout
# (`tests/test_cli_stdout.py` checks that importing this module loads no torch, Ray or
# transformers). The stages import what they need.
from sftmix_ray.errors import SftmixError
from sftmix_ray.io_utils import strict_json
from sftmix_ray.out_lock import output_lock

# Commands beside the stages of `sftmix_ray.stages.STAGES`.
COMMAND_HELP = {
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


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its help text handed to `help_to` (the command's result, see
    `ResultStdout`) instead of printed to `sys.stdout`: fd 1 is elsewhere by then, and
    swapping `sys.stdout` for the parse would also catch every other thread's prints."""

    def __init__(self, *args, help_to: Callable[[str], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._help_to = help_to

    def print_help(self, file=None) -> None:
        if file is None and self._help_to is not None:
            self._help_to(self.format_help())
        else:
            super().print_help(file)


def build_parser(help_to: Callable[[str], None] | None = None) -> argparse.ArgumentParser:
    """The argument parser with one subcommand per stage plus validate-data; `--help` hands
    its text to `help_to` where given."""
    parser = _Parser(
        prog="sftmix-ray", description="SFTMix instruction tuning on Ray.", help_to=help_to
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        # argparse calls it as the class, with the subcommand's keyword arguments.
        parser_class=cast(type[_Parser], functools.partial(_Parser, help_to=help_to)),
    )
    from sftmix_ray.data.formats import FORMATS
    from sftmix_ray.stages import STAGES

    commands = {**{s.name: s.help for s in STAGES}, **COMMAND_HELP}
    for name, text in commands.items():
        stage = sub.add_parser(name, help=text, description=text)
        _add_common(stage)
        if name == "pipeline":
            stage.add_argument(
                "--force", metavar="STAGE", help="rerun STAGE and every stage after it"
            )
            stage.add_argument(
                "--dry-run",
                action="store_true",
                help="run nothing; print which stages would run and the changed values why",
            )
    show = sub.add_parser(
        "show-config",
        help="every config key with its value, default and meaning",
        description="Every config key with its value (after --config and --set), its default "
        "and its meaning.",
    )
    show.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    show.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )  # fmt: skip
    show.add_argument("--json", action="store_true", help="print one JSON list")
    show.add_argument("--debug", action="store_true", help="show tracebacks")
    v = sub.add_parser(
        "validate-data",
        help="count valid and rejected rows of a corpus file, with reasons",
        description="Count valid and rejected rows of a corpus file, with reasons.",
    )
    v.add_argument("--data", required=True, metavar="FILE", help="JSON, JSONL, Parquet or HF id")
    v.add_argument("--format", default="auto", choices=list(FORMATS))
    v.add_argument(
        "--repair",
        default="standard",
        choices=["standard", "none"],
        help="repair what real dumps break, as prepare does by default (data.repair)",
    )
    v.add_argument(
        "--column", dest="columns", action="append", default=[], metavar="FIELD=COLUMN",
        help="read COLUMN as the format's FIELD, as data.columns does (repeatable)",
    )  # fmt: skip
    v.add_argument(
        "--mask-history", action="store_true",
        help="train only each row's last answer, as data.mask_history does",
    )  # fmt: skip
    v.add_argument(
        "--reasoning", default="keep", choices=["keep", "drop"],
        help="keep or drop each answer's reasoning, as data.reasoning does",
    )  # fmt: skip
    v.add_argument(
        "--response-template", metavar="TEXT",
        help="text rows: train only what follows TEXT, as data.response_template does",
    )  # fmt: skip
    v.add_argument(
        "--instruction-template", metavar="TEXT",
        help="text rows: a human turn starts at TEXT, as data.instruction_template does",
    )  # fmt: skip
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _validate_data(args: argparse.Namespace) -> str:
    from sftmix_ray.config import load_config
    from sftmix_ray.data.validation import format_report, validate_file

    # Checked as the config's keys are (a typo names the field it meant; an instruction
    # template needs a response template).
    data = load_config(None, [f"data.columns={','.join(args.columns)}"]).data
    templates = (args.response_template, args.instruction_template)
    data = dataclasses.replace(
        data, response_template=templates[0], instruction_template=templates[1]
    )
    _, report = validate_file(
        args.data, args.format, repair=args.repair, keep_valid=False, columns=data.columns,
        history_masked=args.mask_history, reasoning=args.reasoning, templates=templates,
    )  # fmt: skip
    if args.json:
        return strict_json(report.to_json())
    return format_report(report, args.data)


def _show_config(args: argparse.Namespace) -> str:
    from sftmix_ray.config import load_config
    from sftmix_ray.config_doc import describe, format_rows

    rows = describe(load_config(args.config, args.overrides))
    return strict_json(rows, indent=2, default=str) if args.json else format_rows(rows)


def _run(args: argparse.Namespace) -> str:
    from sftmix_ray.config import load_config
    from sftmix_ray.pipeline import run_pipeline, run_stage

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    out = Path(args.output_dir)
    if args.command == "pipeline" and args.dry_run:  # reads OUT, writes nothing
        result = run_pipeline(cfg, out, force=args.force, dry_run=True)
        return strict_json({args.command: _brief(result)}, indent=2, default=str)
    with output_lock(out, f"sftmix-ray {args.command}"):
        if args.command == "pipeline":
            result = run_pipeline(cfg, out, force=args.force)
        elif args.command == "tune":
            from tuning.sweep import run_tune

            result = run_tune(cfg, out)
        else:
            result = run_stage(args.command, cfg, out)
    return strict_json({args.command: _brief(result)}, indent=2, default=str)


def _brief(result: object) -> object:
    """The result without long per-row lists, for the console."""
    if isinstance(result, dict):
        return {k: _brief(v) for k, v in result.items() if k != "rejections"}
    return result


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C so that stages record it and Ray shuts down cleanly."""


_SIGNALS: list[int] = []  # what stopped the run; libraries may re-raise a plain Ctrl+C
RETRY_SIGNAL_S = 0.05  # how soon a signal that arrived mid-import is delivered again


def _importing(frame: FrameType | None) -> bool:
    """The main thread is inside Python's import machinery (at any depth)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM: raise KeyboardInterrupt (or `Terminated`) in the main thread, except
    in the middle of an import, where it is delivered again a moment later.

    An exception raised while a module executes can unwind through C++ code that cannot take a
    Python exception (torch's `c10d_init` aborts the process: exit -6 instead of 130) or leave
    an import lock held, so that Ray's log thread, importing the same module, deadlocks
    `ray.shutdown()` (the driver hangs). Both were seen with Ctrl+C a second into `prepare`.
    """
    if _importing(frame):
        timer = threading.Timer(RETRY_SIGNAL_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    _SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


# An interrupted or terminated console run exits within this many seconds of stopping work,
# whatever Ray's shutdown does: a Kubernetes pod or `ray job stop` then sees 130/143, not a hang.
EXIT_GRACE_S = 60.0


def _exit_watchdog(code: int, message: str, grace_s: float) -> threading.Timer:
    """Started when an interrupted console run begins its clean-up: if the clean-up has not
    finished after `grace_s`, write the last line and leave with `code` at once."""

    def expire() -> None:
        try:
            os.write(2, f"{message} (clean-up exceeded {grace_s:g} s)\n".encode())
        finally:
            os._exit(code)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True
    timer.start()
    return timer


class ResultStdout:
    """Keeps the process's stdout (file descriptor 1) for the command's result alone.

    Ray, DeepSpeed, Ray Data and every process Ray starts write to fd 1 from Python, from C++
    and from threads, some of them at Ray shutdown (Ray prints its log-deduplication summary
    while disconnecting, at exit). A `contextlib.redirect_stdout` only covers Python writes
    made inside its block, so it cannot keep them out. Instead fd 1 itself is pointed at
    stderr for the whole command (child processes inherit that), the original stdout is kept
    on a private duplicate, and the result is written there once Ray has shut down. The
    console script never points fd 1 back: whatever prints during interpreter exit still goes
    to stderr. In-process callers (tests) get fd 1 back from `close()`.
    """

    def __init__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        self._result: str | None = None

    def write(self, text: str) -> None:
        """Keep the result; `close` writes it."""
        self._result = text

    def close(self, *, restore: bool) -> None:
        """Write the result to the real stdout; `restore` points fd 1 back (in-process use,
        where the result goes through `sys.stdout`, which a caller may have replaced)."""
        sys.stdout.flush()
        if restore:
            os.dup2(self._saved, 1)
            if self._result is not None:  # the stream, not a (patched) `print`
                sys.stdout.write(self._result + "\n")
                sys.stdout.flush()
        elif self._result is not None:
            with os.fdopen(os.dup(self._saved), "w", encoding="utf-8") as stream:
                stream.write(self._result + "\n")
        os.close(self._saved)


def _ray_running() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    """Stop Ray now, so that what it prints while stopping comes before our last line."""
    if _ray_running():
        import ray

        ray.shutdown()


def main(
    argv: list[str] | None = None, *, restore_stdout: bool = True, exit_grace_s: float | None = None
) -> int:
    """Run one command; returns the process exit status.

    On success stdout holds exactly the result (one JSON document for every command that runs
    a stage, and for `validate-data --json`); on failure stdout is empty and stderr's last
    line names the problem. `--help` prints argparse's help as the result; usage errors are
    argparse's, on stderr with status 2.
    With `exit_grace_s` (the console script), an interrupted run that has not cleaned up within
    that many seconds exits at once with its status and line.
    """
    stdout = ResultStdout()  # first: whatever runs from here on cannot print to stdout
    try:  # `--help`'s text is the result
        args = build_parser(help_to=lambda text: stdout.write(text.rstrip("\n"))).parse_args(argv)
    except SystemExit:  # `--help` (its text is the result) or a usage error (on stderr)
        stdout.close(restore=restore_stdout)
        raise
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _on_signal) for sig in handled}
    caller_ray = _ray_running()  # an in-process caller's Ray session is not ours to stop
    watchdog: threading.Timer | None = None
    try:
        try:
            run = {"validate-data": _validate_data, "show-config": _show_config}.get(
                args.command, _run
            )
            result = run(args)
        except KeyboardInterrupt as exc:
            if exit_grace_s is not None:
                watchdog = _exit_watchdog(*_interrupted(args.command, exc), exit_grace_s)
            raise
        finally:
            if not caller_ray:
                _shutdown_ray()
        stdout.write(result)
        return 0
    except (SftmixError, OSError) as exc:
        # OSError: a full disk, a vanished mount, a file we may not write, anywhere in a stage.
        if args.debug:
            raise
        _last_line(f"sftmix-ray {args.command}: error: {_describe(exc)}")
        return 1
    except KeyboardInterrupt as exc:
        code, line = _interrupted(args.command, exc)
        _last_line(line)
        return code
    except Exception as exc:  # a bug or a library failure: traceback first, then the line
        if args.debug:
            raise
        logging.getLogger("sftmix_ray").exception("unexpected failure")
        _last_line(f"sftmix-ray {args.command}: error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stdout.close(restore=restore_stdout)
        if watchdog is not None:
            watchdog.cancel()


def _interrupted(command: str, exc: KeyboardInterrupt) -> tuple[int, str]:
    """Exit status and last line of a run stopped by Ctrl+C or SIGTERM. Finished stages and
    checkpoints stay; rerunning the same command goes on from there."""
    terminated = isinstance(exc, Terminated) or signal.SIGTERM in _SIGNALS
    name = "terminated (SIGTERM)" if terminated else "interrupted"
    return (143 if terminated else 130), f"sftmix-ray {command}: {name}; rerun to resume"


def _last_line(message: str) -> None:
    """The one line that ends stderr on failure (Ray has already been shut down). Written to
    the stream, not through `print`: Ray's tqdm_ray replaces `builtins.print` in a process
    that showed its progress bars, and an in-process caller's print may be patched again."""
    sys.stderr.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def console_main() -> None:
    """The `sftmix-ray` console script: `main` with stdout kept for the result until exit.

    Once `main` has written the result (or the failure's last line), nothing that runs at
    interpreter exit (atexit hooks of libraries, late threads) may print after it: both output
    descriptors go to /dev/null, and the process ends without the interpreter's teardown,
    where a native thread that outlived the command (a reader's I/O pool, a library's
    background thread) could abort it: once, `validate-data` exited with SIGABRT after
    printing its result. Ray is shut down and every output of ours closed by then. `--help`
    and usage errors end the same way, with argparse's status.
    """
    try:
        code = main(restore_stdout=False, exit_grace_s=EXIT_GRACE_S)
    except SystemExit as exc:  # argparse's: `--help` (0) or a usage error (2), already printed
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    logging.shutdown()  # flush and close the handlers: the teardown that would is skipped
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(code)


def _describe(exc: BaseException) -> str:
    """One line for the user: our errors as they are, OS errors with errno text and path."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror} ({type(exc).__name__})"
    return str(exc)


if __name__ == "__main__":
    console_main()
