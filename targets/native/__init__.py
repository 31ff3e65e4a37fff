"""native backend (see ``targets/__init__.py``)."""
