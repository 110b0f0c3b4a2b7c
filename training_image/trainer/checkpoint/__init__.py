"""Checkpoints on object storage: torch.distributed.checkpoint (DCP) through fsspec, with a commit manifest.

The loop uses :class:`CheckpointManager` only (``load``, ``save``, ``wait``, ``close``; its state objects
are registered once, at construction). Where the rest lives:

- :mod:`trainer.checkpoint.manager`: the manager: save/load/latest/retention, async staging, commit order;
- :mod:`trainer.checkpoint.integrity`: what makes a step directory trustworthy: the manifest, sha256 of
  every byte on its way out and in, the allow-list unpickler for DCP's ``.metadata``, ``verify_step``;
- :mod:`trainer.checkpoint.storage_errors`: a failed storage operation as retryable or terminal;
- :mod:`trainer.checkpoint.state`: the per-rank RNG streams and optimizer state as plain tensors.

Layout: ``{checkpoint.uri}/step-{N:08d}/`` holds the DCP files (tensors only: model, optimizer state,
per-rank RNG of torch, python's ``random`` and numpy's ``np.random``), ``trainer_state.json``
(counters, early-stopping state, scheduler, optimizer hyper-parameters, MLflow run id) and, written last
by rank 0, ``manifest.json`` with the sha256 and size of every other file, the step, config hash, world
size and dataset version. A step directory without a valid manifest (a JSON object of that shape) does
not exist as far as :meth:`CheckpointManager.latest` is concerned.
"""

from trainer.checkpoint.integrity import MANIFEST, TRAINER_STATE, Verdict, step_dir_name
from trainer.checkpoint.manager import CheckpointManager, Stateful

__all__ = ["MANIFEST", "TRAINER_STATE", "CheckpointManager", "Stateful", "Verdict", "step_dir_name"]
