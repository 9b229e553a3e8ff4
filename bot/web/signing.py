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
INPUT_PATH_PREFIX = "/inputs"


INPUT_PURPOSE = b"input-image:"


class WebhookSigner:
    def __init__(self, secret_key: bytes) -> None:
        if len(secret_key) < 16:
            raise ValueError("SECRET_KEY must be at least 16 characters long")
        self._key = secret_key

    def token_for(self, job_id: str, purpose: bytes = b"modelslab-webhook:") -> str:
        digest = hmac.new(self._key, purpose + job_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def verify(self, job_id: str, token: str, purpose: bytes = b"modelslab-webhook:") -> bool:
        return hmac.compare_digest(self.token_for(job_id, purpose).encode(), token.encode())

    def input_url(self, public_base: str, job_id: str) -> str:
        """Where ModelsLab fetches a job's input image: unguessable, and not the webhook's token."""
        return f"{public_base.rstrip('/')}{INPUT_PATH_PREFIX}/{job_id}/{self.token_for(job_id, INPUT_PURPOSE)}.png"

    def webhook_url(self, public_base: str, job_id: str) -> str:
        return f"{public_base.rstrip('/')}{WEBHOOK_PATH_PREFIX}/{job_id}/{self.token_for(job_id)}"
