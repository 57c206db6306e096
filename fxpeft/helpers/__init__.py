"""Not the engine: real models and text that ship in pip packages (``models``, ``data``) and
process-memory measuring (``memory``), for the examples, the benchmarks and the command line's
``--model smollm2``. No engine folder imports it (the layer test holds that).
"""
