"""MM-SafetyBench (Liu et al., ECCV 2024): attack success rate judged per scenario and image type."""
