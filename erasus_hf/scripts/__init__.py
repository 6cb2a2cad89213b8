"""The command-line scripts behind `erasus-hf`: argument dataclasses and the functions they run."""
