"""``python -m training.align``: LongAlign's long-text alignment stage (see ``--help``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main("align"))
