"""What the jobs read and how the model sees it: records (`records`), files on any filesystem (`io`), JSON Schemas
(`schema`) and the prompt (`prompt`, the only place prompt text is built)."""
