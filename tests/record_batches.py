"""Runs `run_finetune.main()` and records which training samples this process put in each batch.

Launched by tests/test_run_finetune_distributed.py and tests/test_streaming.py on several processes; writes
`<RECORD_DIR>/rank<N>.json` with the process's rank, the world size, the sample indices of every training batch as the
run assembles them (images held in memory only) and the labels of every training batch as the run reports them after
each step, in order.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_finetune  # noqa: E402


def main():
    batches, labels = [], []

    def record(event: str, values: dict):
        if event == "batch":
            batches.append(values["samples"])
        if event == "step":
            labels.extend(values["labels"])

    run_finetune.main(on_event=record)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    record = {"rank": rank, "world_size": world_size, "train_batches": batches, "train_labels": labels}
    Path(os.environ["RECORD_DIR"], f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
