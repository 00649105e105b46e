"""``python -m memfs`` and the ``memfs`` command.

``memfs restore DIR --pool SOCK`` is answered before argparse and the
command modules load (memfs.pool_request): that process is on the path to a
clone's first tick.  Everything else is memfs.cli.main.
"""

import sys
import time


def main() -> int:
    started = time.monotonic()
    from . import pool_request
    req = pool_request.parse(sys.argv[1:])
    if req is not None:
        return pool_request.ask(req, started)
    from .cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
