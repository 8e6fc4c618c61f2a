"""``rela-pipeline`` with a planted slow phase on rank 0: run under torchrun as a script.

On rank 0, fitting the transport (a phase rank 0 runs alone while the other ranks wait) first
sleeps ``SLOW_PHASE_S`` seconds, as a fit over millions of embeddings would take minutes; every
other rank, and everything else, runs the real CLI with the arguments given.
"""

from __future__ import annotations

import os
import sys
import time

from rela_pipeline.cli import main
from rela_pipeline.stages.embed import run as embed_run

if os.environ.get("RANK") == "0":
    fit = embed_run.fit_linear_transport

    def slow_fit(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_PHASE_S"]))
        return fit(*args, **kwargs)

    embed_run.fit_linear_transport = slow_fit

sys.exit(main(sys.argv[1:]))
