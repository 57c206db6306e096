"""Optional passes on an emitted copy of an adapted graph: ``fuse`` and its clean-up passes,
and ``merge``. (The kinds' splice passes and their manager: ``fxpeft.runtime.passes``.)"""
