"""Distance correlation against values worked out by hand."""
import numpy as np
import pytest

from hpcbrain.evaluate.dcor import distance_correlation


def test_linear_relation_gives_one():
    x = np.array([0.0, 1.0, 2.0, 5.0])
    assert distance_correlation(x, 3 * x - 7) == pytest.approx(1.0)


def test_hand_worked_three_points():
    # x = (0, 1, 2), y = (0, 1, 0).
    # |x_i - x_j| = [[0,1,2],[1,0,1],[2,1,0]]: row means 1, 2/3, 1; grand mean 8/9.
    #   A = [[-10/9, 2/9, 8/9], [2/9, -4/9, 2/9], [8/9, 2/9, -10/9]]
    # |y_i - y_j| = [[0,1,0],[1,0,1],[0,1,0]]: row means 1/3, 2/3, 1/3; grand mean 4/9.
    #   B = [[-2/9, 4/9, -2/9], [4/9, -8/9, 4/9], [-2/9, 4/9, -2/9]]
    # mean(A*B) = (20 + 8 - 16 + 8 + 32 + 8 - 16 + 8 + 20)/81/9 = 72/729
    # mean(A*A) = (100+4+64+4+16+4+64+4+100)/729 = 360/729; mean(B*B) = 144/729
    # dCor = sqrt(72 / sqrt(360 * 144)) = sqrt(72 / 227.684) = 0.56234
    x = np.array([0.0, 1.0, 2.0])
    y = np.array([0.0, 1.0, 0.0])
    assert distance_correlation(x, y) == pytest.approx(np.sqrt(72 / np.sqrt(360 * 144)))


def test_multivariate_x_and_constant_y():
    grid = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert distance_correlation(grid, np.ones(4)) == 0.0
    assert distance_correlation(grid, grid[:, 0] + grid[:, 1]) > 0.8


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same number"):
        distance_correlation(np.arange(3), np.arange(4))
