"""Building blocks of an adapted graph that every stage shares: dotted targets (``targets``),
adapter parameters (``params``), gates (``gates``), dropout as data (``dropout``), the named
adapters' records (``records``) and all-or-nothing edits (``rollback``). Below capture: it
knows nothing of models, rules or kinds.
"""
