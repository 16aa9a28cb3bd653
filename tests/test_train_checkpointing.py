"""Checkpoint manifests (truncation and damage detected before loading) and the data ledger."""
from __future__ import annotations

import json
import shutil

from pipelines.train.checkpointing import TrainState, verify, write_manifest
from pipelines.train.ledger import Ledger, ledger_steps, read_ledger


def _rank_dir(root, rank: int):
    """What one rank writes: its own files, then its manifest last."""
    d = root / f"local{rank}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes(range(256)) * (rank + 3))
    if rank == 0:
        (d / "latest").write_text("ds")
    TrainState(step=4, epoch=1, batches_in_epoch=2, samples_seen=24, world_size=2).write(d, rank)
    write_manifest(d, rank, world_size=2, step=4)
    return d


def _merged(tmp_path):
    """Ray Train merges the ranks' directories into one checkpoint directory in storage."""
    merged = tmp_path / "checkpoint_00000004"
    for rank in range(2):
        shutil.copytree(_rank_dir(tmp_path, rank), merged, dirs_exist_ok=True)
    return merged


def test_complete_checkpoint_verifies_on_every_rank(tmp_path) -> None:
    merged = _merged(tmp_path)
    assert verify(merged, 0, 2) == [] and verify(merged, 1, 2) == []
    manifest = json.loads((merged / "manifest.rank1.json").read_text())
    assert set(manifest["files"]) == {"ds/zero_pp_rank_1_optim_states.pt", "trainer_state.rank1.json"}
    assert TrainState.read(merged, 1) == TrainState(step=4, epoch=1, batches_in_epoch=2, samples_seen=24, world_size=2)


def test_truncated_file_is_detected_by_every_rank(tmp_path) -> None:
    merged = _merged(tmp_path)
    target = merged / "ds" / "zero_pp_rank_1_optim_states.pt"
    target.write_bytes(target.read_bytes()[:100])
    for rank in range(2):
        problems = verify(merged, rank, 2)
        assert len(problems) == 1 and "zero_pp_rank_1_optim_states.pt has 100 bytes" in problems[0]


def test_changed_bytes_are_detected_by_the_owner(tmp_path) -> None:
    merged = _merged(tmp_path)
    target = merged / "ds" / "zero_pp_rank_0_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    assert "sha256" in verify(merged, 0, 2)[0]  # rank 0 re-hashes its own files; the ranks then agree (all-reduce)


def test_missing_manifest_or_other_world_size_is_refused(tmp_path) -> None:
    merged = _merged(tmp_path)
    assert "rank 2 did not finish" in verify(merged, 0, 3)[-1]
    (merged / "manifest.rank1.json").unlink()
    assert any("manifest.rank1.json is missing" in p for p in verify(merged, 0, 2))
    assert "same num_workers" in verify(merged, 0, 1)[0]


def test_ledger_keeps_the_last_entry_per_step(tmp_path) -> None:
    ledger = Ledger(tmp_path, 0)
    for step, keys in [(1, ["a"]), (2, ["b"]), (2, ["c"])]:  # step 2 redone after a restart
        ledger.append({"rank": 0, "step": step, "keys": [keys], "loss": [1.0]})
    ledger.close()
    assert ledger_steps(tmp_path, 0) == 3 and ledger_steps(tmp_path, 1) == 0  # lines: a redone step counts again
    with open(tmp_path / "ledger" / "rank0.jsonl", "a") as f:
        f.write('{"rank": 0, "step": 3, "ke')  # torn by a kill -9
    entries = read_ledger(tmp_path)
    assert sorted(entries) == [(0, 1), (0, 2)] and entries[(0, 2)]["keys"] == [["c"]]
