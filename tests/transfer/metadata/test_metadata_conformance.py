"""Every metadata backend answers to one contract: the checks of
:mod:`pymooncake.testing._metadata_conformance` over memory://, our HTTP server
(through :class:`HttpMetadataStore`), a real etcd and a real Redis."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pymooncake.testing import METADATA_CHECKS
from pymooncake.transfer.metadata import MetadataStore

OpenStore = Callable[[], MetadataStore]


@pytest.mark.parametrize("check", METADATA_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_conformance(
    open_store: OpenStore, prefix: str, check: Callable[[OpenStore, str], None]
) -> None:
    check(open_store, prefix)
