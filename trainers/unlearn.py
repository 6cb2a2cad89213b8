"""Launchable unlearning script: `accelerate launch trainers/unlearn.py --config trainers/recipes/RECIPE.yaml`
(the same as `erasus-hf unlearn --config ...`)."""

import sys

from erasus_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["unlearn", *sys.argv[1:]]))
