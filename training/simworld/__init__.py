"""SimWorld: a deterministic procedural scene generator with exact ground truth."""
