"""refvlm_training (folder training/): VT-Instruct data, SimWorld, staged training, evaluation."""
