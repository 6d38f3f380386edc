"""Run ``meddiff-fm train`` under torchrun and record what each rank ends with.

Usage (from test_training_ddp.py):

    python -m torch.distributed.run --nproc_per_node 2 --standalone ddp_train_worker.py HASH_DIR train ...

Every rank writes ``HASH_DIR/rank{r}.json`` with sha256 hashes of its final raw weights, its
EMA weights and its initial weights, its per-step losses, and whether it left the process group.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_helpers import state_hash  # noqa: E402  (the hash the test compares with)


def main() -> int:
    hash_dir = Path(sys.argv[1])
    argv = sys.argv[2:]

    import torch.distributed as dist

    from MedDiffFMLib import cli, training

    seen = {}
    original_train = training.Trainer.train

    def recording_train(self, on_step=None):
        seen["trainer"] = self
        seen["init"] = state_hash(self.model.state_dict())
        seen["losses"] = original_train(self, on_step)
        return seen["losses"]

    training.Trainer.train = recording_train
    rc = cli.main(argv)
    trainer = seen["trainer"]
    hash_dir.mkdir(parents=True, exist_ok=True)
    rank = trainer.dist.rank
    record = {
        "rank": rank,
        "world": trainer.dist.world,
        "env_rank": int(os.environ.get("RANK", -1)),
        "steps": trainer.step,
        "losses": seen["losses"],
        "init_sha256": seen["init"],
        "raw_sha256": state_hash(trainer.model.state_dict()),
        "ema_sha256": state_hash(trainer.ema),
        "left_group": not dist.is_initialized(),
    }
    (hash_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rc


if __name__ == "__main__":
    sys.exit(main())
