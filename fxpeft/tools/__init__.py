"""Tools on top of the public API: the command line (``cli``), what ``fxpeft convert`` /
``fxpeft merge`` do (``convert``), ``fxpeft.Trainer`` (``trainer``) and pictures (``plots``).
"""
