"""SPA-VL HarmEval / HelpEval (align-anything's pairwise protocol against reference answers)."""
