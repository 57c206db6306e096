"""Stage 2, match: a pure query from rules to match records (``query``), why a rule did or did
not match (``explain``), and the sites beyond linears: attention blocks (``attention``),
embedding and convolution layers (``layer_sites``), the input embedding (``input_embedding``).
"""
