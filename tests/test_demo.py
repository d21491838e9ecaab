"""The quick-start job learns the embedded synthetic set."""

from ist_accel.demo import run_demo


def test_short_resist_training_beats_chance_clearly():
    result = run_demo("preact_resnet20", num_subnets=2, local_steps=10, rounds=20, train_size=2000, progress=False)
    assert result.rounds == 20
    assert result.accuracy > 0.2, result  # 10 classes: chance is 0.1
