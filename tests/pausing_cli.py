"""``rela-pipeline`` whose ``embed`` stops and waits at a known point: run as a script by tests
that interrupt or kill a run, so that what they interrupt never depends on the machine's speed.

Once the journal records embedded rows up to at least ``PAUSE_AFTER_ROWS`` (the record written
and saved), the process creates the file ``PAUSE_READY`` and sleeps until it is signalled or
killed. Everything else is the real CLI with the arguments given.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rela_pipeline.cli import main
from rela_pipeline.stages.embed.journal import EmbedJournal

after_rows, ready = int(os.environ["PAUSE_AFTER_ROWS"]), Path(os.environ["PAUSE_READY"])
record_embedded = EmbedJournal.record_embedded


def record_then_pause(self, start, stop, *args, **kwargs):
    record_embedded(self, start, stop, *args, **kwargs)
    if stop >= after_rows and not ready.exists():
        ready.touch()
        while True:  # a SIGINT raises KeyboardInterrupt here; SIGKILL ends the process
            time.sleep(0.05)


EmbedJournal.record_embedded = record_then_pause

sys.exit(main(sys.argv[1:]))
