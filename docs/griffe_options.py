"""A griffe extension: the API reference shows each loss option's one description.

The docstrings of the losses name their options with placeholders (``rule: {rule}``) that
:func:`properlm.options.document_options` fills at import time from :data:`properlm.options.OPTION_DOCS`, so
``help()`` shows the text; griffe reads the source, so this extension fills the same placeholders in what it reads.
"""

from __future__ import annotations

from typing import Any

import griffe

from properlm.options import fill_option_docs


class OptionDocs(griffe.Extension):
    """Fill the option placeholders of every docstring (:func:`properlm.options.fill_option_docs`)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Fill the placeholders of ``obj``'s docstring, as :func:`properlm.options.document_options` does."""
        if obj.docstring is not None and "{" in obj.docstring.value:
            obj.docstring.value = fill_option_docs(obj.docstring.value)
