"""The package's public surface is pinned, and the error tree drawn in errors.py is true."""

from __future__ import annotations

import inspect
import re

import bpfsync
import bpfsync.errors


def _error_classes() -> set[str]:
    return {name for name, obj in inspect.getmembers(bpfsync.errors, inspect.isclass)
            if issubclass(obj, bpfsync.errors.BpfsyncError)}


def test_exported_names() -> None:
    assert sorted(bpfsync.__all__) == sorted([
        "BpfsyncError", "Change", "ClockDriftError", "ConfigError", "IncompatiblePeerError",
        "InvalidError", "KernelError", "KeyNotFoundError", "MalformedMessageError",
        "MapFullError", "NotFoundError", "NotMemberError", "NotSupportedError", "Op",
        "OversizedMessageError", "Overflow", "PeerError", "PermissionDeniedError", "Seen",
        "SizeMismatchError", "TransportError", "UnauthenticatedPeerError", "UnknownMapError",
        "VerifierError", "WatchEvent", "__version__",
    ])
    for name in bpfsync.__all__:
        assert getattr(bpfsync, name) is not None


def test_every_error_a_user_can_catch_is_exported() -> None:
    assert _error_classes() <= set(bpfsync.__all__)


def test_the_drawn_tree_matches_the_classes() -> None:
    """Each class in errors.py's drawing, at its depth, is a direct subclass of the class
    above it in the drawing; and every error class is drawn."""
    doc = bpfsync.errors.__doc__ or ""
    drawn: list[tuple[int, str]] = []
    for line in doc.splitlines():
        found = re.match(r"^(\s*)(?:[│ ]*[├└]── )?([A-Z]\w*Error)\b", line)
        if found:
            drawn.append((line.index(found.group(2)), found.group(2)))
    assert {name for _, name in drawn} == _error_classes()
    parents: list[tuple[int, str]] = []
    for column, name in drawn:
        while parents and parents[-1][0] >= column:
            parents.pop()
        cls = getattr(bpfsync.errors, name)
        if parents:
            assert getattr(bpfsync.errors, parents[-1][1]) in cls.__bases__, (name, parents)
        parents.append((column, name))
