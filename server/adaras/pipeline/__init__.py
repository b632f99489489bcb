"""Offline AdaRAS pipeline: collect, identify, train-predictor, eval."""
