"""`python -m jsonextract` is the `jsonextract` command (what the main job's steps run, in the same environment)."""
from jsonextract.cli import main

main()
