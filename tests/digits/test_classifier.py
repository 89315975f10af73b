import pytest
import torch

from d2m_dist.digits.classifier import digit_accuracy, digits_split, load_digit_classifier


def test_reads_held_out_real_digits():
    split = digits_split()
    assert split.test_images.shape == (360, 8, 8)
    assert split.test_images.min() >= -1 and split.test_images.max() <= 1
    assert digit_accuracy(split.test_images, split.test_labels) >= 0.95


def test_held_out_digits_are_unseen():
    split = digits_split()
    train = {tuple(x.flatten().tolist()) for x in split.train_images}
    unseen = sum(tuple(x.flatten().tolist()) not in train for x in split.test_images)
    # sklearn's digits hold a few exact duplicates; nearly all test images must be new
    assert unseen >= 0.95 * len(split.test_images)


def test_wrong_prompts_score_zero_and_shapes_are_checked():
    split = digits_split()
    images, labels = split.test_images[:50], split.test_labels[:50]
    predicted = load_digit_classifier().predict(images)
    assert digit_accuracy(images, (predicted + 1) % 10) == 0.0
    with pytest.raises(ValueError):
        digit_accuracy(images, labels[:10])
    with pytest.raises(ValueError):
        digit_accuracy(torch.zeros(4, 64), torch.zeros(4))
