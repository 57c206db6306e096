"""Stage 1, capture: a model becomes a ``Program`` (a GraphModule plus its index of linear
sites). Frontends (``export``), the linear-site index (``linear_sites``), capture-once-replicate
(``replicate``), the in-process capture cache (``cache``), bitsandbytes layers as graph ops
(``quantized``) and what capture knows of transformers models (``hf``).
"""
