"""Schemathesis hooks of ``tests/integration/test_http_api.py``: bodies for the STOW-RS request type
(multipart/related of DICOM files), which schemathesis cannot generate by itself."""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

STOW = 'multipart/related; type="application/dicom"'

schemathesis.openapi.media_type(STOW, st.binary(max_size=512))
