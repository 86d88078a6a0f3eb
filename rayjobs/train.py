"""Launch file for Ray's job API: `ray job submit --working-dir . -- python rayjobs/train.py --config FILE [key=value ...]`.
The same as `jsonextract train` (jsonextract/training/job.py); `--help` lists every setting."""
import sys

from jsonextract.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
