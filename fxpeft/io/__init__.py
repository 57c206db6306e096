"""Adapters on disk: ``save`` / ``load`` in HF PEFT's layout (``serialize``), folders replaced
atomically (``folders``), and what a PEFT file may hold beyond its tensors (``file_contents``).
"""
