"""SIUO (Safe Inputs but Unsafe Output, NAACL 2025): safe / effective rates and multiple-choice accuracy."""
