"""Launch file for Ray's job API: `ray job submit --working-dir . -- python rayjobs/pipeline.py --config FILE`.
The same as `jsonextract run` (jsonextract/pipeline.py), the main job end to end; `--help` lists every setting."""
import sys

from jsonextract.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
