"""POST /github-webhook: a signed `workflow_run` event on main starts the deploy command."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re

from .base import BaseHandler, HTTPError

log = logging.getLogger("threecompute.webhook")
SIGNATURE = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
# Read before the signature can be checked, so kept small: workflow_run payloads are tens of KB.
MAX_WEBHOOK_BYTES = 1024 * 1024
DELIVERY_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")  # GitHub's are UUIDs
DELIVERY_MEMORY_SECONDS = 86400.0


class GithubWebhookHandler(BaseHandler):
    max_body_bytes = MAX_WEBHOOK_BYTES

    def check_origin_for_unsafe_method(self) -> None:
        """GitHub sends no Origin; the signature is what authenticates this endpoint."""

    async def post(self) -> None:
        secret = self.services.settings.github_webhook_secret
        if not secret:
            raise HTTPError(503, "webhook secret is not configured")
        match = SIGNATURE.match(self.request.headers.get("X-Hub-Signature-256", ""))
        if match is None:
            raise HTTPError(400, "X-Hub-Signature-256 must be sha256= and 64 hex digits")
        expected = hmac.new(secret.encode(), self.request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, match.group(1).lower()):
            raise HTTPError(403, "signature does not match")
        try:
            event = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "body is not valid JSON") from None
        if not await self.first_delivery():
            log.info("webhook ignored: duplicate delivery %s", self.request.headers["X-GitHub-Delivery"])
            self.set_header("X-Reason", "duplicate delivery")
            self.answer({"status": "duplicate"})
            return
        reason = skip_reason(event)
        if reason:
            log.info("webhook ignored: %s", reason)
            self.set_header("X-Reason", reason)
            self.set_status(204)
            self.finish()
            return
        started = self.services.deployer.trigger()
        self.answer({"status": "started" if started else "queued"}, 200 if started else 202)

    async def first_delivery(self) -> bool:
        """A delivery id seen in the last day is a replay (or GitHub's redelivery): run nothing.

        The id is not covered by the signature; it stops redeliveries and replays of a
        captured request as sent. Requests without one are not deduplicated.
        """
        delivery = self.request.headers.get("X-GitHub-Delivery")
        if delivery is None:
            return True
        if not DELIVERY_ID.match(delivery):
            raise HTTPError(400, "X-GitHub-Delivery must be 1-100 letters, digits or dashes")
        return await self.services.store.first_delivery(delivery, DELIVERY_MEMORY_SECONDS)


def skip_reason(event: object) -> str | None:
    if not isinstance(event, dict):
        return "payload is not a JSON object"
    run = event.get("workflow_run")
    run = run if isinstance(run, dict) else {}
    if event.get("action") != "completed":
        return f"action is {event.get('action')!r}, not 'completed'"
    conclusion = run.get("conclusion", event.get("conclusion"))
    if conclusion != "success":
        return f"conclusion is {conclusion!r}, not 'success'"
    branch = run.get("head_branch", event.get("head_branch"))
    if branch != "main":
        return f"head_branch is {branch!r}, not 'main'"
    return None
