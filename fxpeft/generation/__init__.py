"""Generation: the KV-cached decode graph of an adapted causal LM (``decode_graph``) and the
decoding loop, ``fxpeft.generate`` (``decoding``).
"""
