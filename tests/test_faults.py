"""Fault injection specs (alice_ds.engine.faults), read per rank, and what each hook does."""

import errno
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from alice_ds.engine.faults import OVERFLOW_SCALE, Faults
from alice_ds.errors import UserError


def test_fault_specs_parse_per_rank_and_refuse_unknown_forms():
    spec = "nan:1:2:1,overflow:1:3,term:1:4,usr1:0:5,enospc:0:6"
    f = Faults(spec, rank=1)
    assert (f.nan, f.overflow, f.signal_at, f.enospc_step) == ({2: 1.0}, {3: math.inf}, {4: signal.SIGTERM}, None)
    f = Faults(spec, rank=0)
    assert (f.nan, f.overflow, f.signal_at, f.enospc_step) == ({}, {}, {5: signal.SIGUSR1}, 6)
    for bad, msg in (("term:0", "cannot parse 'term:0'"), ("kill:0:1", "unknown fault 'kill:0:1'"),
                     ("term:0:1:2", "unknown fault 'term:0:1:2'"), ("exit:0:1", "unknown fault 'exit:0:1'")):
        with pytest.raises(UserError, match=msg + r".*enospc:RANK:STEP"):
            Faults(bad, rank=0)


def test_loss_faults_count_forward_passes_and_enospc_raises_in_save():
    f = Faults("nan:0:2:1,overflow:0:2:2", rank=0)
    loss = {"loss": torch.tensor(2.0)}
    got = [float(f.loss(loss, 2)["loss"]) for _ in range(4)]
    assert math.isnan(got[0]) and got[1:] == pytest.approx([2.0 * OVERFLOW_SCALE] * 2 + [2.0], rel=1e-7)  # fp32
    assert float(f.loss(loss, 3)["loss"]) == 2.0
    f = Faults("enospc:0:2", rank=0)
    f.in_save(1)
    with pytest.raises(OSError) as e:
        f.in_save(2)
    assert e.value.errno == errno.ENOSPC


SIGNALLED_GROUP = """
import os, signal, sys, time
from alice_ds.engine.faults import Faults
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
Faults("usr1:0:3", rank=0).at_step_end(2)
Faults("usr1:0:3", rank=0).at_step_end(3)
time.sleep(0.5)
print(len(got))
"""


def test_group_signal_reaches_every_process_of_the_group():
    """`usr1:0:3` sends SIGUSR1 to the rank's whole process group after step 3 only: here a process
    group of the rank and a sleeping sibling (a stand-in for a DataLoader worker, which ignores it)."""
    rank = subprocess.Popen([sys.executable, "-c", SIGNALLED_GROUP], stdout=subprocess.PIPE, text=True,
                            process_group=0, env=dict(os.environ))
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], process_group=rank.pid)
    out, _ = rank.communicate(timeout=60)
    assert rank.returncode == 0 and out.strip() == "1"
    assert sibling.wait(timeout=10) == -signal.SIGUSR1  # the default action: the sibling got it too
