"""Per-job webhook tokens: ModelsLab documents no signature, so the URL itself must be the secret.

Each job's callback URL is `{PUBLIC_URL}/webhooks/modelslab/{job_id}/{token}`, the token an HMAC of
the job id under `SECRET_KEY`. Nothing needs storing, tokens differ from the `track_id`, and a leaked
token opens only its own job.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

WEBHOOK_PATH_PREFIX = "/webhooks/modelslab"


class WebhookSigner:
    def __init__(self, secret_key: bytes) -> None:
        if len(secret_key) < 16:
            raise ValueError("SECRET_KEY must be at least 16 characters long")
        self._key = secret_key

    def token_for(self, job_id: str) -> str:
        digest = hmac.new(self._key, b"modelslab-webhook:" + job_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def verify(self, job_id: str, token: str) -> bool:
        return hmac.compare_digest(self.token_for(job_id).encode(), token.encode())

    def webhook_url(self, public_base: str, job_id: str) -> str:
        return f"{public_base.rstrip('/')}{WEBHOOK_PATH_PREFIX}/{job_id}/{self.token_for(job_id)}"
