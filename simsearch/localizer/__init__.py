"""The class + box head over cached feature maps: model, training and evaluation, prediction."""
