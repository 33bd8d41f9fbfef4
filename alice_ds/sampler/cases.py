"""Which cached cases the pair sampler can use: a readable cache entry and, with SAM pairing, an
embedding file made from that very volume. Unusable cases are skipped with a warning naming the
problem; above `max_bad_fraction` of them the run stops with an error."""

from __future__ import annotations

from alice_ds.console import progress, warn
from alice_ds.data.cache import open_case
from alice_ds.errors import DataError, UserError
from alice_ds.sam.io import open_embedding


def usable_cases(cache_dir, embed_dir, ids: list[str], max_bad_fraction: float,
                 show: bool = True) -> tuple[list[str], dict[str, str]]:
    """(usable case ids in `ids` order, {skipped case id: why})."""
    if not ids:
        raise UserError(f"{cache_dir}: no cached cases (run `alice-ds preprocess` first)")
    valid, skipped = [], {}
    with progress(disable=not show, transient=True) as bar:
        task = bar.add_task("checking cases and embeddings", total=len(ids))
        for cid in ids:
            bar.advance(task)
            try:
                case = open_case(cache_dir, cid)
            except DataError as e:
                skipped[cid] = str(e)
                continue
            problem = None if embed_dir is None else embedding_problem(embed_dir, case)
            if problem is None:
                valid.append(cid)
            else:
                skipped[cid] = problem
    for cid, why in skipped.items():
        warn(f"pair sampler skips case {cid}: {why}")
    bad = len(skipped) / len(ids)
    if bad > max_bad_fraction:
        first = next(iter(skipped.items()))
        where = embed_dir if embed_dir is not None else cache_dir
        raise DataError(where, f"{len(skipped)} of {len(ids)} cases are unusable ({bad:.0%} > "
                               f"max_bad_fraction={max_bad_fraction:.0%}); first: {first[0]}: {first[1]}")
    if embed_dir is not None and len(valid) < 2:
        raise UserError(f"{embed_dir}: inter pairs need at least 2 usable cases, got {len(valid)} "
                        "(pass embed_dir=None for intra-only sampling)")
    return valid, skipped


def embedding_problem(embed_dir, case) -> str | None:
    """Why the case's embedding file cannot be used with its cached volume, or None when it can."""
    try:
        ef = open_embedding(embed_dir, case.case_id)
    except DataError as e:
        return e.problem
    if ef.case_id != case.case_id:
        return f"embedding file belongs to case {ef.case_id!r}"
    return ef.coverage_problem(case.affine, case.shape)
