"""On a trained model the Taylor partition beats the random one (docs/BENCHMARKS.md has the full table)."""

from d2m_dist.bench import partition
from d2m_dist.config import CalibrationConfig
from d2m_dist.digits.batches import digits_batches


def test_taylor_beats_random_at_k2_on_a_trained_teacher(digits_teacher):
    teacher = str(digits_teacher)
    calib = list(digits_batches(teacher, CalibrationConfig(num_batches=4, batch_size=32, seed=0)))
    held_out = list(digits_batches(teacher, CalibrationConfig(num_batches=4, batch_size=32, seed=999)))
    rows = partition.run(teacher, calib, held_out, spec="1S12E2A", top_k=2,
                         strategies=("taylor-contiguous", "random"), random_seeds=(0, 1, 2))
    taylor, random = rows
    assert taylor["_ffn"] < random["_ffn"]
    assert taylor["_velocity"] < random["_velocity"]
