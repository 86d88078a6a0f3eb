"""Object storage for real: an S3-compatible server (moto's, on 127.0.0.1) started for these tests and stopped after,
reached the way a user reaches a real bucket: the standard AWS environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), nothing special-cased in the product. The batch job reads
its input from the bucket and writes its results and summary there; every input row comes out once."""
import json
import os
import subprocess

from conftest import BUCKET, JSONEXTRACT, ROOT, SNIPS, put


def test_batch_job_reads_and_writes_the_bucket(s3, tiny_model):
    from jsonextract.data.io import read_results

    lines = (SNIPS / "test.jsonl").read_text().splitlines()[:30]
    put(s3["fs"], "in/part-a.jsonl", ("\n".join(lines[:20]) + "\n").encode())
    put(s3["fs"], "in/part-b.jsonl", ("\n".join(lines[20:]) + "\n{not json\n").encode())  # a bad line: an error row
    out = f"s3://{BUCKET}/out/run1"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **s3["env"])
    r = subprocess.run([JSONEXTRACT, "extract", "--config", "configs/extract/cpu.yaml", "adapter=",
                        f"model.name={tiny_model}", f"schema={SNIPS / 'schema.json'}",
                        f"input=s3://{BUCKET}/in/*.jsonl", f"output={out}", "decoding.max_new_tokens=8",
                        "pool.batch_rows=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_results(out)
    ids = [row["id"] for row in rows]
    want = {json.loads(line)["id"] for line in lines}
    assert len(ids) == 31 and want <= set(ids) and len(set(ids)) == 31  # every row once, the bad line included
    bad = [row for row in rows if row["id"] not in want]
    assert len(bad) == 1 and bad[0]["error"].startswith("bad_input:") and "part-b.jsonl:11" in bad[0]["error"]
    with s3["fs"].open_input_stream(f"{BUCKET}/out/run1/_summary.json") as f:
        summary = json.loads(f.read())
    assert summary["rows_in"] == 31 and summary["rows_written"] == 31
    assert sum(summary["errors_by_reason"].values()) + summary["valid"] == 31

    # Running again into the same output resumes: nothing left to do, nothing written twice.
    again = subprocess.run(r.args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(row["id"] for row in read_results(out)) == sorted(ids)


def test_training_from_and_to_the_bucket_then_extraction_with_that_adapter(s3, tiny_model):
    """Train and dev files and the schema in the bucket, Ray Train's checkpoints (`run.storage_path`) and the final
    adapter written there; the batch job then loads the adapter from the bucket."""
    import pyarrow.fs as pafs

    from jsonextract.data.io import read_results

    fs = s3["fs"]
    train = (SNIPS / "train.jsonl").read_text().splitlines()[:96]
    put(fs, "data/train.jsonl", ("\n".join(train) + "\n").encode())
    put(fs, "data/dev.jsonl", ("\n".join((SNIPS / "dev.jsonl").read_text().splitlines()[:16]) + "\n").encode())
    put(fs, "data/schema.json", (SNIPS / "schema.json").read_bytes())
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **s3["env"])
    adapter = f"s3://{BUCKET}/adapters/tiny"
    r = subprocess.run([JSONEXTRACT, "train", "--config", "configs/train/tiny_cpu.yaml", f"model.name={tiny_model}",
                        f"data.train_file=s3://{BUCKET}/data/train.jsonl", f"data.dev_file=s3://{BUCKET}/data/dev.jsonl",
                        "data.cache_dir=", "optim.max_steps=4", "optim.batch_size=8", "optim.warmup_steps=1",
                        "eval.every_steps=0", "eval.loss_examples=8", "eval.decode_samples=2",
                        "eval.calibration_records=8", "decoding.max_new_tokens=16", "lora.r=4", "lora.alpha=8",
                        "run.name=bucket", f"run.storage_path=s3://{BUCKET}/runs", f"run.output_dir={adapter}",
                        "run.checkpoint_every_steps=2", "run.log_every_steps=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with fs.open_input_stream(f"{BUCKET}/adapters/tiny/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["step"] == 4 and "calibration" in manifest
    assert fs.get_file_info(f"{BUCKET}/adapters/tiny/adapter_model.safetensors").type == pafs.FileType.File
    checkpoints = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/bucket", recursive=True))
                   if i.path.endswith("manifest.json")]
    assert checkpoints, "no checkpoint in the bucket"

    out = f"s3://{BUCKET}/out/tuned"
    x = subprocess.run([JSONEXTRACT, "extract", "--config", "configs/extract/cpu.yaml", f"adapter={adapter}",
                        f"input=s3://{BUCKET}/data/dev.jsonl", f"output={out}", "decoding.max_new_tokens=16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert x.returncode == 0, x.stdout[-3000:] + x.stderr[-3000:]
    assert len(read_results(out)) == 16
