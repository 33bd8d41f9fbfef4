"""Test-wide settings. Environment first: TRITON_INTERPRET must be set before any kernel is defined,
DS_ACCELERATOR before deepspeed is imported."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ALICE_DS_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402

SLOW_FIXTURES = {"ds_run", "ds_launch", "sam_checkpoint", "sam_embed_dir"}
"""A test that uses one of these starts DeepSpeed jobs or trains a SAM: marked `slow` automatically."""


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_process_group():
    """A test must not leave a process group or a launcher's variables in pytest's process: later
    in-process code (Accelerate, `alice_ds.dist`, forked ranks) would join them."""
    import torch.distributed as dist

    before = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    assert after == before, f"the test changed the launcher variables: {before} -> {after}"
    assert not (dist.is_available() and dist.is_initialized()), "the test left a process group initialised"


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# ---- Data fixtures (alice_ds.data: phantom -> datalist -> cache), shared by every module's tests ----

PHANTOM_CASES = 4
PHANTOM_CACHE_SPACING = (3.0, 3.0, 3.0)
"""Coarse enough that the whole fixture chain takes seconds; the anatomy is the same in mm."""


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Four small phantom cases (FLARE layout, seed 0): imagesTr/, labelsTr/, landmarks/, dataset.json.
    Case 2 and 4 are stored RAS, case 1 LPS, case 3 LAS."""
    from alice_ds.data.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_dataset(out, num=PHANTOM_CASES, seed=0, small=True)
    return out


@pytest.fixture(scope="session")
def phantom_datalist(phantom_dir):
    """Path of a decathlon datalist of the phantom cases (3 training, 1 validation), relative to
    `phantom_dir`."""
    from alice_ds.data.datalist import build_datalist, write_datalist

    return write_datalist(build_datalist(phantom_dir, val_fraction=0.25, seed=0),
                          phantom_dir.parent / f"{phantom_dir.name}_datalist.json")


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir, phantom_datalist, tmp_path_factory):
    """Preprocessed cache of the phantom cases at 3 mm isotropic (ids `Case_0000N_0000`)."""
    from alice_ds.data.preprocess import preprocess_dataset

    cache = tmp_path_factory.mktemp("phantom_cache")
    preprocess_dataset(phantom_dir, phantom_datalist, cache, spacing=PHANTOM_CACHE_SPACING, show=False)
    return cache
# ---- end of data fixtures ----


# ---- SAM fixtures (alice_ds.sam: tiny SAMNet trained a few steps on phantom_cache, then embedded) ----
SAM_TEST_WIDTH = 0.125
SAM_TEST_ROI = 32
SAM_TEST_STEPS = 2
SAM_TEST_SPACING = 4.0
"""4 mm instead of SAM's 2 mm grid: 8x fewer voxels to embed. Just enough training that the network
is not at its initialisation; accuracy is measured by `alice-ds sam-eval` on real runs, not here."""


@pytest.fixture(scope="session")
def sam_checkpoint(phantom_cache, tmp_path_factory):
    """`OUT/sam.safetensors` (+ .json) of a width-0.125 SAMNet on a 4 mm grid, trained 2 steps on
    phantom_cache with the real `alice-ds sam-train` (checkpoints every step under OUT/checkpoints)."""
    from alice_ds.cli import main

    out = tmp_path_factory.mktemp("sam_train")
    assert main(["sam-train", "--cache_dir", str(phantom_cache), "--output_dir", str(out),
                 "--steps", str(SAM_TEST_STEPS), "--save_every", "1", "--batch_size", "2",
                 "--roi", str(SAM_TEST_ROI), "--width", str(SAM_TEST_WIDTH), "--seed", "0",
                 "--spacing", str(SAM_TEST_SPACING)]) == 0
    return out / "sam.safetensors"


@pytest.fixture(scope="session")
def sam_embed_dir(phantom_cache, sam_checkpoint, tmp_path_factory):
    """Embeddings (`<case_id>.safetensors`) of every phantom_cache case, written by `alice-ds embed`."""
    from alice_ds.cli import main

    out = tmp_path_factory.mktemp("sam_embed")
    assert main(["embed", "--cache_dir", str(phantom_cache), "--sam_checkpoint", str(sam_checkpoint),
                 "--embed_dir", str(out)]) == 0
    return out
# ---- end of SAM fixtures ----


# ---- Engine fixtures (alice_ds.engine: real 2-rank DeepSpeed pretraining runs, shared by tests) ----
ENGINE_YAML = """\
model: {preset: tiny, out_dim: 256, patch_out_dim: 256, head_hidden_dim: 512, head_bottleneck_dim: 128,
        casa_heads: 4, casa_ffn_dim: 512}
data: {num_workers: 0}
sampler: {roi: 64}
run: {batch_size: 1, save_every: 1, keep_last: 0, val_batches: 1}
optim: {lr: 0.2, min_lr: 1.0e-6, warmup_steps: 0, freeze_last_layer_steps: 1, momentum_start: 0.9,
        weight_decay: 5.0, weight_decay_end: 5.0}
loss: {warmup_teacher_temp_steps: 5}
"""
"""presets/tiny.yaml with every step checkpointed, no lr warmup (step 1 already moves the weights), a
teacher momentum of 0.9 so the EMA moves by far more than the 1e-6 tolerance of the EMA test, a weight
decay large enough (lr x wd ~ 1 % of a weight per step) that a wrong one shows in the numerics-parity
test, and one validation batch per rank."""

ENGINE_RUNS = {
    # stage: (ds_configs/<name>.json, num_steps, extra flags, nodes, ALICE_DS_FAULT); nodes=2 runs two
    # `deepspeed.launcher.launch` processes
    0: ("zero0_bf16", 2, ["--grad_accum", "2", "--num_workers", "2"], 1, "overflow:1:1:1"),
    3: ("zero3_bf16", 2, ["--overfit_one_batch", "--center_momentum", "1"], 1, ""),
    2: ("zero2_bf16", 2, ["--val_every", "1", "--augment_on", "device"], 1, ""),
    1: ("fp32", 2, [], 2, ""),
}
"""The shared runs, each the reference of an exact-resume test (tests/test_engine.py). ZeRO-0 (the
one-GPU config) accumulates 2 micro-batches per step with 2 DataLoader workers per rank, and rank 1's
first forward of step 1 overflows the gradients (the trainer drops that update). ZeRO-3 overfits one
batch with frozen loss centers (so 2 accumulated micro-batches of it equal one: the offload run
checks that). ZeRO-2 validates every step (the best one -> `best`) and applies the view augmentation
in the trainer (`--augment_on device`; the others resolve `auto` to `worker` on the CPU). These three
use the bf16 autocast configs as shipped, plus sanity checks. ZeRO-1 trains on two 'nodes' in fp32.
All the other updates must happen (the tests assert it): on the CPU, oneDNN's bf16 Conv3d weight
gradient is garbage (finite entries of 1e29-1e34, or inf/NaN) when the input depth is 2..kernel-1,
i.e. `encoder10` at roi 64 (2^3 grid), which overflows DeepSpeed's fp32 gradient norm and skips the
update, unless the trainer runs those convolutions in fp32 (`alice_ds.engine.cpu_bf16`,
ds_configs/README.md, benchmarks/cpu_bf16_conv3d.py)."""


@pytest.fixture
def free_port():
    """A function returning a free TCP port of 127.0.0.1 (for a gloo rendezvous)."""
    return _free_port


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def engine_inputs(phantom_dir, phantom_cache, tmp_path_factory):
    """(config yaml, datalist, DeepSpeed configs dir) for engine runs: every phantom case trains, and
    two also form the validation split (one per rank)."""
    import json

    from alice_ds.data.cache import list_cases

    root = tmp_path_factory.mktemp("engine_inputs")
    (root / "tiny.yaml").write_text(ENGINE_YAML)
    cases = list_cases(phantom_cache)
    entries = [{"image": f"imagesTr/{c}.nii.gz"} for c in cases]
    (root / "datalist.json").write_text(json.dumps({"training": entries, "validation": entries[-2:]}))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("zero0_bf16", "zero1_bf16", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16", "fp32"):
        cfg = json.load(open(os.path.join(repo, "ds_configs", f"{name}.json")))
        if cfg["zero_optimization"]["stage"] > 0:
            cfg["zero_optimization"]["enable_sanity_checks"] = True
        (root / f"{name}.json").write_text(json.dumps(cfg))
    return root


GROUP_EXIT_TIMEOUT_S = 120
"""After the launcher returns, the processes of its process group (ranks, DataLoader workers) must be
gone within this: a preempted launcher dies at once while its ranks still checkpoint."""


def group_processes(pgid: int) -> list:
    """The live processes of process group `pgid`."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def wait_for_group(pgid: int, timeout: float = GROUP_EXIT_TIMEOUT_S) -> list[int]:
    """Wait until no process of group `pgid` is alive; -> the pids still alive at the timeout (then
    killed)."""
    import time

    deadline = time.monotonic() + timeout
    while (alive := group_processes(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in alive:
        p.kill()
    return [p.pid for p in alive]


@pytest.fixture(scope="session")
def ds_launch(engine_inputs, phantom_dir, phantom_cache):
    """`ds_launch(out_dir, ds_config, num_steps, extra=[], nodes=1, wait=True, env={},
    launcher="deepspeed", ranks=2)` (`ds_config`: a name of the shared configs or a path): run
    launch/train.py on 2 ranks through the real DeepSpeed launcher (`deepspeed --num_gpus 2`, or
    `ranks` of them on one node, or with nodes=2 two `python -m deepspeed.launcher.launch
    --node_rank 0/1` processes sharing one master); `launcher="torchrun"`: `torchrun --nproc_per_node
    2`; `launcher="slurm"`: two plain processes with only the variables `srun` sets (SLURM_JOB_ID=4242,
    SLURM_STEP_ID, SLURM_PROCID/LOCALID, SLURM_NTASKS/STEP_NUM_TASKS, SLURM_JOB_NODELIST; MASTER_PORT
    as launch/slurm.sbatch may export it); `launcher="mpi"`: two plain processes with only the variables
    `deepspeed --launcher mpich` and its mpirun set (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MASTER_ADDR,
    MASTER_PORT, WORLD_SIZE, LOCAL_SIZE). Every launch is a process group of its own (a session; the
    plain processes share one), as a job is: a fault that signals its process group reaches the
    launcher, the ranks and their DataLoader workers, never pytest. `env` is added to the environment
    (e.g. `ALICE_DS_FAULT`). Returns the launcher Popen objects; with `wait`, they have finished and
    so has every process of their groups (an AssertionError names the survivors). stdout+stderr go
    to `<out_dir>/launch<i>.log`."""
    import base64
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def launch(out_dir, ds_config, num_steps, extra=(), nodes=1, wait=True, env=None, launcher="deepspeed",
               ranks=2):
        out_dir.mkdir(parents=True, exist_ok=True)
        args = [os.path.join(repo, "launch", "train.py"), "--config", str(engine_inputs / "tiny.yaml"),
                "--deepspeed_config", str(ds_config if isinstance(ds_config, os.PathLike)
                                          else engine_inputs / f"{ds_config}.json"),
                "--data_dir", str(phantom_dir), "--json_list", str(engine_inputs / "datalist.json"),
                "--cache_dir", str(phantom_cache), "--output_dir", str(out_dir),
                "--num_steps", str(num_steps), *extra]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", ALICE_DS_PROGRESS="0", **(env or {}))
        port = str(_free_port())
        envs = [env]
        plain = {k: v for k, v in env.items()
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        if launcher == "torchrun":
            cmds = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_addr", "127.0.0.1", "--master_port", port, *args]]
        elif launcher == "slurm":  # what `srun` gives each task of a 2-task job step: SLURM_* only
            cmds = [[sys.executable, "-u", *args] for _ in range(2)]
            envs = [dict(plain, SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                         SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="127.0.0.1",
                         MASTER_PORT=port) for i in range(2)]
        elif launcher == "mpi":  # `deepspeed --launcher mpich`: mpirun's PMI_* plus the runner's -genv
            cmds = [[sys.executable, "-u", *args] for _ in range(2)]
            envs = [dict(plain, PMI_RANK=str(i), PMI_SIZE="2", MPI_LOCALRANKID=str(i), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port, WORLD_SIZE="2", LOCAL_SIZE="2") for i in range(2)]
        elif nodes == 1:
            cmds = [[os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
                     "--master_port", port, *args]]
        else:
            info = base64.urlsafe_b64encode(json.dumps({f"node{i}": [0] for i in range(nodes)}).encode()).decode()
            cmds = [[sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
                     f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}", *args]
                    for i in range(nodes)]
        envs = envs * len(cmds) if len(envs) == 1 else envs
        one_group = launcher in ("slurm", "mpi")  # the tasks of one job step; launchers: a session each
        procs = []
        for i, (c, e) in enumerate(zip(cmds, envs)):
            group = dict(process_group=procs[0].pid if procs else 0) if one_group else dict(start_new_session=True)
            procs.append(subprocess.Popen(c, env=e, stdout=open(out_dir / f"launch{i}.log", "ab"),
                                          stderr=subprocess.STDOUT, cwd=repo, **group))
        if wait:
            for p in procs:
                p.wait(timeout=900)
            left = [pid for pgid in sorted({p.pid for p in procs} if not one_group else {procs[0].pid})
                    for pid in wait_for_group(pgid)]
            assert not left, f"processes of the run in {out_dir} still alive after the launcher exited: {left}"
        return procs

    return launch


@pytest.fixture(scope="session")
def ds_run(ds_launch, tmp_path_factory):
    """`ds_run(stage) -> output_dir` of a finished 2-rank run of ZeRO-`stage` (1, 2 or 3; see
    ENGINE_RUNS), trained once per session and shared (export tests read its checkpoints)."""
    done: dict[int, object] = {}

    def run(stage: int):
        if stage not in done:
            ds_config, steps, extra, nodes, fault = ENGINE_RUNS[stage]
            out = tmp_path_factory.mktemp(f"ds_run_zero{stage}")
            procs = ds_launch(out, ds_config, steps, extra, nodes=nodes, env={"ALICE_DS_FAULT": fault})
            logs = "\n".join((out / f"launch{i}.log").read_text()[-3000:] for i in range(len(procs)))
            assert all(p.returncode == 0 for p in procs), f"ZeRO-{stage} run failed:\n{logs}"
            done[stage] = out
        return done[stage]

    return run
# ---- end of engine fixtures ----
