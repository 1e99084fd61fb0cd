"""The ``vitc`` command line: one app, one module per verb under ``vitc/commands``.

Heavy libraries are imported inside the commands, so ``vitc --help`` stays fast. User errors
(``VitcError``) print one line and exit non-zero; ``--debug`` anywhere on the command line
(or ``VITC_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

import typer

from vitc.commands.bench import bench_app
from vitc.commands.compress import compress_cmd
from vitc.commands.evaluate import eval_cmd
from vitc.commands.export import export_cmd
from vitc.commands.info import info
from vitc.commands.merge import merge_cmd
from vitc.commands.prune import prune_cmd
from vitc.commands.quantize import quantize_cmd
from vitc.commands.report import report_cmd
from vitc.commands.sparsify import sparsify_cmd
from vitc.commands.sweep import sweep_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="vitc: compress vision backbones, export them, check parity, and gate latency.")
app.command("info")(info)
app.command("eval")(eval_cmd)
app.command("export")(export_cmd)
app.command("merge")(merge_cmd)
app.command("prune")(prune_cmd)
app.command("quantize")(quantize_cmd)
app.command("sparsify")(sparsify_cmd)
app.command("compress")(compress_cmd)
app.command("sweep")(sweep_cmd)
app.command("report")(report_cmd)
app.add_typer(bench_app, name="bench")


QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VITC_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    from vitc.artifacts import command_scope, disk_error, find_disk_error, terminate, terminated
    from vitc.errors import VitcError

    if not debug:  # libraries imported on the way (transformers -> torchao) log import-time noise that is not the user's
        import logging

        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)

    # A CI runner's timeout sends SIGTERM: unwind like an exception so atomic writes remove
    # their staging paths instead of leaving half artifacts behind.
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, terminate)
    try:
        # Without standalone mode click returns typer.Exit's code instead of raising it.
        with command_scope():  # output claims taken by the command are released when it ends
            code = app(args=argv, prog_name="vitc", standalone_mode=False)
    except VitcError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return terminated() or int(code or 0)
    except Exception as exc:  # click usage errors and the unexpected
        if terminated() is not None:  # a library turned the termination into its own error
            return terminated()
        # typer may ship its own copy of click, so recognise click's exceptions by shape, not class
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            print("aborted", file=sys.stderr)
            return 130
        if debug:
            raise
        full = find_disk_error(exc)
        if full is not None:  # a full disk is the disk's fault, whatever library hit it
            print(f"error: {disk_error(full, getattr(full, 'filename', None) or 'the output')}", file=sys.stderr)
            return 2
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {first} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    return terminated() or (code if isinstance(code, int) else 0)


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
