"""Launch file for Ray's job API: `ray job submit --working-dir . -- python rayjobs/extract.py --config FILE input=... output=...`.
The same as `jsonextract extract` (jsonextract/batch/job.py); `--help` lists every setting."""
import sys

from jsonextract.cli import main

if __name__ == "__main__":
    main(["extract", *sys.argv[1:]])
