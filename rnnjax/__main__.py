"""``python -m rnnjax`` and the ``rnnjax`` command (``start``).

Importing JAX and the rest takes a second or two. A Ctrl-C meanwhile is only counted, so that no
import is cut short (a KeyboardInterrupt inside a C extension's import turns into an ImportError,
or is swallowed by a callback); once the imports are done, it is one line and exit 130, as it is
everywhere else in the command.
"""

import signal
import sys


def start() -> None:
    presses = []
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # not started with Ctrl-C ignored
        signal.signal(signal.SIGINT, lambda signum, frame: presses.append(signum))
        from rnnjax.app.cli import script

        signal.signal(signal.SIGINT, signal.default_int_handler)
    else:
        from rnnjax.app.cli import script
    try:
        if presses:
            raise KeyboardInterrupt
        script()
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    start()
