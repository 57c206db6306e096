"""Stage 3, emit and run: the ``AdaptedModule`` users call (``adapted_module``), the emit step
(``emit``), the call-time HF input/output adapters (``hf_io``), the kinds' splice passes and
their manager (``passes``), splicing one named adapter (``apply``), the whole pipeline
(``rewrite``) and the warm-start compile cache (``compile_cache``).
"""
