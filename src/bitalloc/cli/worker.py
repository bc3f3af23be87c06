"""The entry point of a measurement worker process (:mod:`bitalloc.measure_pool` starts it as
``python -c "from bitalloc.cli.worker import main; main(THREADS, LEVEL)"``): like the CLI's own, it sets torch's
threads once, before any work, and the logging level of the process that started it; Ctrl-C is left to that
process, which stops its workers."""
from __future__ import annotations

import logging
import signal


def main(threads: int, level: int) -> None:
    import torch

    from ..measure_pool import serve_requests

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    serve_requests()
