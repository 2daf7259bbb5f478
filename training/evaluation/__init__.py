"""Evaluation suite: the paper's metrics (``metrics``) and a runner that puts a
Predictor through an evaluation set (``runner``). Importing this package is cheap;
the runner and the metric modules import their heavy dependencies themselves."""
