"""Text in, validated JSON out: the `extractor` (prompts, grammars, results), the decoding `loop` and its parts
(`grammar`, `kv_cache`, `vocab_head`, `scheduling`), the `reference` engine, `grounding` and confidence, and
`predict` (one process, no Ray)."""
