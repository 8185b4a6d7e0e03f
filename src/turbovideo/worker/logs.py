"""The worker's log: one redacting handler on stderr, so that no secret or signed URL reaches a log line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping

# Values of these variables never reach a log line, whatever logs them.
SECRET_VARIABLES = ("HF_TOKEN", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")
# A presigned URL's query string is a bearer credential.
_SIGNED_QUERY = re.compile(r"\?[^\s'\"]*(?:X-Amz-|Signature=)[^\s'\"]*", re.IGNORECASE)


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values of SECRET_VARIABLES, as set and as clients send them (trimmed)."""
    values = [env[name] for name in SECRET_VARIABLES if env.get(name)]
    return values + [v.strip() for v in values]


class RedactSecrets(logging.Filter):
    """Belt and braces: blank out known secret values and signed query strings in every record."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Short values would blank out ordinary words; real keys and tokens are long.
        self.secrets = sorted((s for s in secrets if len(s) >= 8), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return _SIGNED_QUERY.sub("?<signature redacted>", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = self.redact(message), None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def configure_logging(secrets: list[str]) -> None:
    """INFO logs to stderr through the redacting filter; idempotent.

    Libraries install plain stream handlers of their own: the runpod SDK calls ``logging.basicConfig``
    when imported (``rp_upload``) and huggingface_hub puts one on its logger at import. Each would print
    every line a second time, unredacted (signed CDN URLs included), so they go.
    """
    try:
        import huggingface_hub.utils.logging  # noqa: F401  (so its handler exists now and can go)
    except Exception:  # e.g. a HF_HUB_* value it cannot parse at import: load_config names it
        pass

    root = logging.getLogger()
    for logger_ in (root, logging.getLogger("huggingface_hub")):
        for handler in [h for h in logger_.handlers if type(h) is logging.StreamHandler]:
            if not getattr(handler, "turbovideo", False):
                logger_.removeHandler(handler)
    for handler in root.handlers:
        if getattr(handler, "turbovideo", False):
            handler.filters = [RedactSecrets(secrets)]
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.turbovideo = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
