"""jsonextract: fine-tune a causal LM to turn text into JSON that validates against a schema, and run it in batch
and online on Ray. Packages by concern, each importing only those below it (pyproject.toml's import-linter
contract): `cli` and `pipeline` on top; `training` and `batch` (the jobs); `decoding` and `evaluation`; `models`;
`data`; `config`; `hardware`, `errors`, `lazy`, `logs` at the bottom."""
