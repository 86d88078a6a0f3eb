"""The training job (`job`: Ray Train's TorchTrainer around the per-worker `recipe`), its batches, FSDP2 set-up,
checkpoints, loss, dev evaluation, and the confidence temperature fitted after training."""
