"""The ``jobd`` command (and ``python -m jobd``).

A SIGHUP's default action ends a process, and the daemon's own handler (a reload) is in
place only once it serves: one that comes while Python imports and jobd reads its config
is held here instead (SPEC §1: SIGHUP never stops the daemon), and the daemon reloads
once it serves. Any other command lets a held SIGHUP take its course (``cli.main``).
"""

import signal


class HeldHangup:
    """The SIGHUP handler while jobd starts: ``heard`` once one came."""

    heard = False

    def __call__(self, signum: int, frame: object) -> None:
        self.heard = True


def run() -> None:
    signal.signal(signal.SIGHUP, HeldHangup())
    from jobd.cli import main
    main()


if __name__ == "__main__":
    run()
