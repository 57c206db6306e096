"""HF PEFT's vocabulary, below the kinds that speak it: keys, target regexes and config fields
(``peft_format``), and PEFT config objects as rules (``peft_config``).
"""
