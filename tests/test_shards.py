"""Sharded `preprocess` and `embed`: which share a process takes (`--shard`, a SLURM array,
torchrun's ranks), and N shards writing into one folder at the same time give exactly the files of
one unsharded run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PHANTOM_CACHE_SPACING
from safetensors import safe_open

from alice_ds.cli import main
from alice_ds.errors import UserError
from alice_ds.sam.io import TENSORS
from alice_ds.shards import Shard, resolve_shard, shard_from_env


def test_shares_are_every_nth_of_the_sorted_cases_in_the_callers_order():
    cases = [f"Case_{i:05d}" for i in (7, 3, 1, 9, 4)]
    shares = [Shard(i, 3).take(cases) for i in range(3)]
    assert shares == [["Case_00007", "Case_00001"], ["Case_00003", "Case_00009"], ["Case_00004"]]
    assert Shard().take(cases) == cases
    assert Shard(5, 8).take(cases[:2]) == []  # more shards than cases: some get none
    with pytest.raises(UserError, match="shard 3/3"):
        Shard(3, 3)


def test_environment_gives_the_share():
    assert shard_from_env({}) == Shard()
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4",
             "RANK": "1", "WORLD_SIZE": "2"}
    assert shard_from_env(slurm) == Shard(2, 4, "SLURM array")  # the array wins over ranks
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2, "RANK/WORLD_SIZE")
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) == Shard()
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1"}) == Shard()
    assert resolve_shard(Shard(0, 5, "--shard"), slurm) == Shard(0, 5, "--shard")
    with pytest.raises(UserError, match="outside 10..13"):
        shard_from_env({**slurm, "SLURM_ARRAY_TASK_ID": "20"})  # an array with holes (--array=10,20)
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        shard_from_env({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/3"])
def test_bad_shard_flag_is_a_usage_error(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["preprocess", "--data_dir", str(tmp_path), "--json_list", "x.json", "--cache_dir",
              str(tmp_path), f"--shard={bad}"])
    assert e.value.code == 2
    assert "--shard: expected I/N" in capsys.readouterr().err


def _folder(path) -> dict:
    """Every file of a folder (hidden temporaries included) -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _run_concurrently(commands: list[tuple[list[str], dict]]) -> None:
    env0 = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-m", "alice_ds.cli", *args], env={**env0, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args, env in commands]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out


def test_two_preprocess_shards_fill_one_cache_like_one_run(phantom_dir, phantom_datalist, phantom_cache, tmp_path):
    """Shard 0/2 from the flag and 1/2 from a SLURM array's variables, running at the same time."""
    cache = tmp_path / "cache"
    base = ["preprocess", "--data_dir", str(phantom_dir), "--json_list", str(phantom_datalist),
            "--cache_dir", str(cache), "--spacing", *map(str, PHANTOM_CACHE_SPACING)]
    (tmp_path / "cache").mkdir()
    stale = cache / ".Case_00002_0000.npy.tmp-999999999"  # a killed writer's leftover (pid gone)
    stale.write_bytes(b"x")
    _run_concurrently([(base + ["--shard", "0/2"], {}),
                       (base, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"})])
    assert _folder(cache) == _folder(phantom_cache)  # same names and bytes; the leftover is gone
    ids = sorted(p.stem for p in cache.glob("*.json"))
    assert len(ids) == 4 and all(json.loads((cache / f"{i}.json").read_text())["case_id"] == i for i in ids)


def test_two_embed_shards_fill_one_folder_like_one_run(phantom_cache, sam_checkpoint, sam_embed_dir, tmp_path):
    """Two torchrun-style ranks (RANK/WORLD_SIZE) embedding into one folder at the same time."""
    out = tmp_path / "embed"
    base = ["embed", "--cache_dir", str(phantom_cache), "--sam_checkpoint", str(sam_checkpoint),
            "--embed_dir", str(out), "--device", "cpu"]
    _run_concurrently([(base, {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in range(2)])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in sam_embed_dir.iterdir())
    for p in out.iterdir():  # same metadata and tensors (safetensors' header order may differ)
        with safe_open(p, "pt") as a, safe_open(sam_embed_dir / p.name, "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()) == sorted(TENSORS)
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), (p.name, k)

