"""The integration tests need the optional extra (``pip install dvemb[huggingface]``)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the huggingface extra")
