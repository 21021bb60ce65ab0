"""Whether the running test may mount a FUSE filesystem: set by ``conftest``'s autouse
fixture from the test's ``mount`` marker, checked by every mount helper. (Its own module:
pytest may load ``conftest.py`` under a second module name, and a flag kept there would
then exist twice.)"""

from __future__ import annotations

import pytest

marked_mount = False  # the running test carries the ``mount`` marker
#: arguments every chunkfs mount of the running test gets first (``conftest.mounted``), e.g. a
#: module running its tests over both FUSE transports sets ``--fuse-transport native``
mount_args: list[str] = []


def require_mount_marker() -> None:
    """Fail a test that mounts a FUSE filesystem (a chunkfs mount, the CSI plugin) without
    the ``mount`` marker, so ``-m "not mount"`` runs none. (A tmpfs is no FUSE mount.)"""
    if not marked_mount:
        pytest.fail("this test mounts a FUSE filesystem but is not marked 'mount' (pytest.mark.mount)",
                    pytrace=False)
