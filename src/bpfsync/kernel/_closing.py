"""``with`` support for the kernel layer's objects that own a kernel resource."""

from __future__ import annotations

from typing import Self


class Closing:
    """``with x:`` closes ``x`` at the end of the block (maps, objects, links, BTF)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
