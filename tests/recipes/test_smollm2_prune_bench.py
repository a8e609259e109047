"""The smollm2-prune benchmark's targets, on rows shaped as its run produces them (a 50-minute run was lost
at its end: the target loop looked up pattern "unstructured", the rows say "50% unstructured")."""

from benchmarks.smollm2_prune import _label, mark_targets


def test_targets_find_the_rows_of_every_pattern_and_skip_block_removal():
    rows = [{"method": "base", "pattern": "dense", "wiki_ppl": 10.0}]
    for pattern in ("unstructured", "2:4"):
        rows += [{"method": m, "pattern": _label(pattern), "wiki_ppl": v}
                 for m, v in (("magnitude", 30.0), ("wanda", 20.0), ("sparsegpt", 13.0))]
    rows += [{"method": "sparsegpt + w4", "pattern": "2:4", "wiki_ppl": 11.0},
             {"method": "block removal", "pattern": "4 of 30 blocks", "wiki_ppl": 40.0}]
    marked = mark_targets(rows, ("unstructured", "2:4"))
    met = {(r["method"], r["pattern"]): r["met"] for r in marked if "met" in r}
    assert met == {("sparsegpt", "50% unstructured"): "yes", ("sparsegpt", "2:4"): "yes"}
    assert marked[-1]["vs_base"] == "+300.00%"
