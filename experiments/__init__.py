"""Experiment scripts (``python experiments/<name>.py``) and the helpers they share."""
