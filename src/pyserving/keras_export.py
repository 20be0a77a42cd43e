"""`from pyserving.keras_export import export_classifier`, as the README shows.

The code lives in `pyserving.tools.keras_export`; this module is the public name users import.
"""

from pyserving.tools.keras_export import export_classifier

__all__ = ["export_classifier"]
