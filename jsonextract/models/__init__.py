"""Models: loading a base for training (`loading`) and a base + adapter for inference (`inference`), the adapter
manifest (`manifest`) and registry (`adapters`), the merged-weights cache, attention and matmul precision at
inference, the embedded SmolLM2 base (`base`) and the tiny random test model (`tiny`)."""
