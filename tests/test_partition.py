"""The seeded partition of a training set over the workers (--split), and the node-local
path templates (--data with {rank}/{node}): pure, one process."""

import numpy as np
import pytest

from ist_accel.data.partition import Split, parse_split, partition
from ist_accel.node_local import check_local_path, expand, is_local_template, local_source

LABELS = np.repeat(np.arange(10), 500)[np.random.default_rng(3).permutation(5000)]  # 10 classes, shuffled


def disjoint_and_covering(parts, n):
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == n and sorted(flat) == list(range(n))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "dirichlet:1", "classes:2", "classes:3"])
def test_partition_is_seeded_disjoint_and_covers_the_set(spec):
    parts = partition(LABELS, 8, spec, seed=0)
    disjoint_and_covering(parts, len(LABELS))
    assert parts == partition(LABELS, 8, spec, seed=0)  # the same for every method of a benchmark
    assert parts != partition(LABELS, 8, spec, seed=1)


def classes_per_part(parts, share=0.05):
    """Classes that make up at least ``share`` of each part."""
    return [sum(np.bincount(LABELS[p], minlength=10) >= share * len(p)) for p in parts]


def test_iid_parts_are_equal_and_hold_every_class():
    parts = partition(LABELS, 4, "iid", seed=0)
    assert {len(p) for p in parts} == {1250}
    assert classes_per_part(parts) == [10] * 4


def test_dirichlet_skew_grows_as_alpha_shrinks():
    """Label skew, measured as the mean total-variation distance between a part's class mix and
    the whole set's (uniform): near 0 for iid, large for alpha 0.1, in between for alpha 1."""

    def skew(spec):
        parts = partition(LABELS, 4, spec, seed=0, min_size=32)
        mixes = [np.bincount(LABELS[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(m - 0.1).sum() for m in mixes]))

    iid, mild, strong = skew("iid"), skew("dirichlet:1.0"), skew("dirichlet:0.1")
    assert iid < 0.05 < mild < strong and strong > 0.45, (iid, mild, strong)
    assert np.mean(classes_per_part(partition(LABELS, 4, "dirichlet:0.1", seed=0, min_size=32))) < 6


def test_classes_k_gives_each_worker_exactly_k_classes():
    for workers, k in ((4, 3), (5, 2), (10, 1), (8, 2)):
        parts = partition(LABELS, workers, f"classes:{k}", seed=0)
        disjoint_and_covering(parts, len(LABELS))
        assert [len(np.unique(LABELS[p])) for p in parts] == [k] * workers


def test_bad_specs_and_impossible_partitions_are_clear_errors():
    assert parse_split("dirichlet:0.5") == Split("dirichlet", 0.5) and str(parse_split("classes:2")) == "classes:2"
    assert parse_split("dirichlet:0.1").slug == "dirichlet0.1"
    for bad in ("dirichlet", "dirichlet:0", "dirichlet:-1", "classes:1.5", "classes:0", "zipf:2", "iid:3"):
        with pytest.raises(ValueError, match="expected iid, dirichlet:ALPHA"):
            parse_split(bad)
    with pytest.raises(ValueError, match="3 workers x 2 classes must hold all 10"):
        partition(LABELS, 3, "classes:2")
    with pytest.raises(ValueError, match=r"fewer than 4000 items"):
        partition(LABELS, 4, "dirichlet:0.1", min_size=4000)


def test_templates_expand_per_rank_and_ranks_sharing_a_folder_split_it(tmp_path):
    assert is_local_template("/data/site{node}") and is_local_template("x{rank}") and not is_local_template("/data")
    assert expand("/d/n{node}/r{rank}", 5, 1, 1) == "/d/n1/r5"
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{host\}"):
        expand("/d/{host}", 0, 0, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    by_node = local_source(str(tmp_path / "site{node}"), env)
    assert (by_node.path, by_node.node, by_node.share_index, by_node.share_count) == (str(tmp_path / "site1"), 1, 1, 2)
    by_rank = local_source(str(tmp_path / "w{rank}"), env)
    assert (by_rank.path, by_rank.share_count) == (str(tmp_path / "w3"), 1)
    with pytest.raises(FileNotFoundError) as error:
        check_local_path(by_node)
    assert f"rank 3 (node 1): {tmp_path}/site{{node}} with {{node}}=1 -> {tmp_path}/site1" in str(error.value)
