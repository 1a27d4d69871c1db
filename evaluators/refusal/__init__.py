"""The refusal-keyword proxy shared by the safety benchmarks (``--judge keyword``)."""
