"""The ``lrx`` script and ``python -m lrx``: the CLI, with Ctrl-C and SIGTERM caught from its first line.

torch, typer and rich take seconds to import on a busy machine; a SIGTERM (``timeout``, a scheduler) that
lands while they load must end lrx as one during a run does (one line, exit code 130), not kill it with the
signal's default action. So the handler is installed here, before the CLI is imported.
"""
import signal
import sys

from lrx.base.errors import EXIT_INTERRUPTED, interrupt

__all__ = ["EXIT_INTERRUPTED", "main"]


def main() -> None:
    signal.signal(signal.SIGTERM, interrupt)
    try:
        from lrx.cli import app  # local: the CLI's imports take seconds; the handler above must come first

        app(prog_name="lrx")
    except KeyboardInterrupt:  # while lrx loads or exits: a command catches its own, after recording it in its run
        sys.stderr.write("lrx: error: interrupted while lrx was loading or exiting, outside any command's work\n")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        # The command is over, its files written or refused. Python then puts its signal handlers back to the
        # default actions while it (and torch) shut down, which takes a while on a busy machine: a SIGTERM or
        # Ctrl-C then killed a finished lrx with the signal (exit -15 or -2). Ignored, lrx exits as it was to.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
