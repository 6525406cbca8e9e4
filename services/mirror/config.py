"""Settings of the mirror and the reconciler (variables ``MIRROR_*``)."""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from libs.common.settings import CommonSettings


class MirrorSettings(CommonSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the mirror forwards to Kafka, and how the reconciler judges parity."""

    ENV_PREFIX: ClassVar[str] = "MIRROR_"
    SERVICE: ClassVar[str] = "mirror"

    http_port: Annotated[int, Meta(ge=0, le=65535, description="port of the HTTP endpoint")] = 9104
    patterns: Annotated[list[str], Meta(description="Redis channel patterns to mirror")] = msgspec.field(
        default_factory=lambda: ["ticks.*", "bars.*.1m", "sentio.*"]
    )
