"""Fault injection specs (alice_ds.engine.faults), read per rank."""

import pytest


def test_fault_specs_parse_per_rank_and_refuse_unknown_forms():
    from alice_ds.engine.faults import Faults
    from alice_ds.errors import UserError

    f = Faults("nan:1:2:1,exit:0:3,term:1:4", rank=1)
    assert (f.nan, f.exit_step, f.term_step) == ({2: 1.0}, None, 4)
    f = Faults("nan:1:2:1,exit:0:3,term:1:4", rank=0)
    assert (f.nan, f.exit_step, f.term_step) == ({}, 3, None)
    for bad, msg in (("term:0", "cannot parse 'term:0'"), ("kill:0:1", "unknown fault 'kill:0:1'"),
                     ("term:0:1:2", "unknown fault 'term:0:1:2'")):
        with pytest.raises(UserError, match=msg + r".*term:RANK:STEP"):
            Faults(bad, rank=0)
