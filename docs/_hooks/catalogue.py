"""mkdocs hook: generated tables (detectors, training methods, the command line) in the pages that ask for them."""

from __future__ import annotations

from timm_ood.catalogue import render_markers


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """Replace ``<!-- timm-ood:... -->`` markers with tables generated from the code."""
    return render_markers(markdown)
