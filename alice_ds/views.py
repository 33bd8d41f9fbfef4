"""The two views of an Alice sample (DESIGN §4 step 1), in the order the sampler produces them and
the meta-architecture reads them: the *query* crop in case A and the *anchor* crop at its match in
case B. Batch keys are built from these names (`query`, `query_mask`, `anchor_center_mm`, ...;
docs/interfaces.md "Pair sampler")."""

VIEWS = ("query", "anchor")
