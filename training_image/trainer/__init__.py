"""ctrain's training task: ``torchrun --nproc-per-node=N -m trainer train --config FILE [--set k=v ...]``."""
