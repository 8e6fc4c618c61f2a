"""``rela-pipeline`` with a shard writer that stops one rank: run under torchrun as a script.

On the rank named by ``INTERRUPT_RANK``, the shard writer raises KeyboardInterrupt instead of
writing its ``INTERRUPT_AT_SAMPLE``-th sample (0-based), as Ctrl-C would; every other rank, and
everything else, runs the real CLI with the arguments given.
"""

from __future__ import annotations

import os
import sys

from rela_pipeline.cli import main
from rela_pipeline.shards.writer import ShardSetWriter

if os.environ.get("RANK") == os.environ.get("INTERRUPT_RANK"):
    stop_at, written = int(os.environ["INTERRUPT_AT_SAMPLE"]), [0]
    original = ShardSetWriter.write

    def write(self, sample):
        if written[0] == stop_at:
            raise KeyboardInterrupt
        written[0] += 1
        original(self, sample)

    ShardSetWriter.write = write

sys.exit(main(sys.argv[1:]))
