"""``rela-pipeline`` whose ``embed`` stops and waits at a known point: run as a script by tests
that interrupt or kill a run, so that what they interrupt never depends on the machine's speed.

Once the journal records embedded rows up to at least ``PAUSE_AFTER_ROWS`` (the record written
and saved), the process creates the file ``PAUSE_READY`` and sleeps until it is signalled or
killed. With ``PAUSE_AFTER_SAMPLES`` instead, every shard writer (a forked shard-writing
process, or the process itself) does so once it has written that many samples, creating
``PAUSE_READY.<its pid>``. Everything else is the real CLI with the arguments given.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rela_pipeline.cli import main
from rela_pipeline.shards.writer import ShardSetWriter
from rela_pipeline.stages.embed.journal import EmbedJournal

after_rows, ready = int(os.environ.get("PAUSE_AFTER_ROWS", 1 << 62)), Path(os.environ["PAUSE_READY"])
after_samples = int(os.environ.get("PAUSE_AFTER_SAMPLES", 1 << 62))
record_embedded = EmbedJournal.record_embedded
write_sample = ShardSetWriter.write
written = {}  # pid -> samples written (a forked writer starts from its parent's copy)


def record_then_pause(self, start, stop, *args, **kwargs):
    record_embedded(self, start, stop, *args, **kwargs)
    if stop >= after_rows and not ready.exists():
        ready.touch()
        while True:  # a SIGINT raises KeyboardInterrupt here; SIGKILL ends the process
            time.sleep(0.05)


def write_then_pause(self, sample):
    write_sample(self, sample)
    written[os.getpid()] = written.get(os.getpid(), 0) + 1
    if written[os.getpid()] == after_samples:
        Path(f"{ready}.{os.getpid()}").touch()
        while True:
            time.sleep(0.05)


EmbedJournal.record_embedded = record_then_pause
ShardSetWriter.write = write_then_pause

sys.exit(main(sys.argv[1:]))
