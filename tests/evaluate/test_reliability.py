"""Test–retest reliability measures on published and hand-worked numbers."""
from __future__ import annotations

import numpy as np
import pytest

from hpcbrain.evaluate.reliability import icc_2_1, node_agreement, runs_table, visits_of


def test_icc_2_1_on_shrout_and_fleiss_table_2():
    # Shrout & Fleiss (1979), Table 2: 6 targets × 4 judges; their ICC(2,1) = 0.29
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
               [6, 2, 4, 7]]
    assert icc_2_1(ratings) == pytest.approx(0.2898, abs=5e-4)
    # identical runs: perfect agreement; a constant offset between runs costs absolute agreement
    perfect = np.array([[60.0, 60.0], [70.0, 70.0], [80.0, 80.0]])
    assert icc_2_1(perfect) == pytest.approx(1.0)
    assert icc_2_1(perfect + [0.0, 5.0]) < 0.9
    with pytest.raises(ValueError, match="complete"):
        icc_2_1([[1.0, 2.0]])


def test_runs_table_and_node_agreement_pair_the_runs_of_a_visit():
    paths = ["sub-01_ses-01_run-1_T1w.nii.gz", "sub-01_ses-01_run-2_T1w.nii.gz",
             "sub-01_ses-02_run-1_T1w.nii.gz", "sub-01_ses-02_run-2_T1w.nii.gz",
             "sub-02_ses-01_run-1_T1w.nii.gz", "sub-02_ses-01_run-2_T1w.nii.gz",
             "sub-03_T1w.nii.gz"]                           # scanned once: in no pair
    assert visits_of(paths[-1:]) == ([("03", "01")], [1])
    table = runs_table(paths, np.arange(7.0))
    assert table.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    rows = np.array([0, 0, 1, 2, 3, 3, 0])
    cols = np.array([0, 0, 1, 1, 4, 6, 0])
    # pairs: (0,0)-(0,0) same; (1,1)-(2,1) neighbours; (3,4)-(3,6) two apart
    agreement = node_agreement(paths, rows, cols)
    assert agreement == {"same_node": pytest.approx(1 / 3),
                         "same_or_neighbour": pytest.approx(2 / 3), "pairs": 3.0}
