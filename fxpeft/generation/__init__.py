"""Generation: the KV-cached decode graph of an adapted causal LM (``decode_graph``), the
decoding loop, ``fxpeft.generate`` (``decoding``), and ``fxpeft.package`` (``package``), which
compiles that graph, or the forward graph, into an AOTInductor package.
"""
