"""``python -m training.lcm``: latent consistency distillation into a LoRA student (see ``--help``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main("lcm"))
