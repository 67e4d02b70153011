"""`python stalling_save.py MARKER <dsv3 args>`: run dsv3 with the step-12 checkpoint stalling after every
file but the manifest is written (its directory goes to MARKER), so a test can kill the save mid-write.
Run directly or under torchrun (rank 0 writes the manifest)."""

import sys
import time
from pathlib import Path

from dsv3.cli import main
from dsv3.train import checkpoint

marker = Path(sys.argv[1])
write_manifest = checkpoint.write_manifest


def stalling_write_manifest(directory, step):
    if step == 12:
        marker.write_text(str(directory))
        time.sleep(120)
    write_manifest(directory, step)


checkpoint.write_manifest = stalling_write_manifest
sys.exit(main(sys.argv[2:]))
