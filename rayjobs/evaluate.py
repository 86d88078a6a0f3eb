"""Launch file for Ray's job API: `ray job submit -- python rayjobs/evaluate.py predictions=... gold=...`.
The same as `jsonextract evaluate` (jsonextract/evaluation/job.py); `--help` lists every setting."""
import sys

from jsonextract.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
