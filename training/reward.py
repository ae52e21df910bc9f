"""``python -m training.reward``: LongAlign's decomposed-preference reward stage (see ``--help``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main("reward"))
