"""User-facing errors: raised for bad input, caught by the CLI and printed as one message; interruptions
(Ctrl-C, SIGTERM) end the same way."""

import contextlib
import signal
import sys
import threading


class EmbedkitError(Exception):
    """A problem with the user's input (config, data, paths), not a bug.

    The message names what is wrong (file, line, key) and what to do. The CLI prints it without a
    traceback and exits with code 2.
    """

    exit_code = 2


def find_user_error(e: BaseException | None) -> EmbedkitError | None:
    """The ``EmbedkitError`` behind ``e``, also when Hydra's ``instantiate`` wrapped it (else None)."""
    while e is not None:
        if isinstance(e, EmbedkitError):
            return e
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def interrupts_as_messages(prog: str, hint: str = "re-run the same command to resume"):
    """Make SIGTERM behave like Ctrl-C and end either with one line on stderr.

    Inside the block SIGTERM raises ``KeyboardInterrupt``, so ``finally`` blocks and the atomic writes
    (``embedkit.io``) remove their temporary files exactly as for Ctrl-C; a second SIGTERM during that
    cleanup is ignored (SIGKILL still works). The process exits with 128 + the signal number: 130 for
    Ctrl-C (SIGINT), 143 for SIGTERM.
    """
    received: list[int] = []

    def on_term(signum, _frame):
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        print(f"\n{prog}: interrupted ({signal.Signals(signum).name}); finished results, caches and checkpoints "
              f"are complete files and no partial file was left; {hint}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
