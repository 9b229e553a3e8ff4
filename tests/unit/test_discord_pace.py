"""The pure rules behind the bot's Discord budget: what a waiting member reads, and what Discord's answers mean."""

from __future__ import annotations

import pytest

from bot.discord.rate_limits import AckFailure, acknowledgement_failure, classify, rate_limit_scope, route_of
from bot.jobs.ports import PresentationDeferred, PresentationRefused
from bot.jobs.progress import EditBudget, about_ahead

VIA = {"Via": "1.1 google"}


@pytest.mark.parametrize(
    ("ahead", "shown"),
    [(20, 20), (24, 20), (25, 30), (94, 90), (95, 100), (99, 100), (100, 100), (149, 100), (150, 200), (994, 1000)],
)
def test_far_places_read_a_round_number(ahead, shown):
    assert about_ahead(ahead) == shown


def test_a_line_moving_by_one_changes_few_round_numbers():
    """995 waiting move up one place: of the round numbers, only those at a rounding boundary change."""
    changed = sum(1 for ahead in range(21, 995) if about_ahead(ahead) != about_ahead(ahead - 1))
    assert changed <= 20


def test_an_edit_budget_allows_its_edits_then_waits_for_the_oldest_to_leave_the_window():
    budget = EditBudget(2, 5.0)
    assert budget.free_at(100.0) == 100.0
    budget.spend(100.0)
    budget.spend(101.0)
    assert budget.free_at(102.0) == 105.0
    assert budget.free_at(105.0) == 105.0 and not budget.idle(105.0)
    assert budget.idle(106.0)


@pytest.mark.parametrize(
    ("headers", "scope"),
    [
        (VIA | {"X-RateLimit-Scope": "user"}, "user"),
        (VIA | {"X-RateLimit-Scope": "shared"}, "shared"),
        (VIA | {"X-RateLimit-Scope": "global", "X-RateLimit-Global": "true"}, "global"),
        (VIA | {"X-RateLimit-Global": "true"}, "global"),
        (VIA, "user"),
        ({}, "ban"),  # Cloudflare's answer: none of Discord's headers
        ({"generated-by-proxy": "true", "Retry-After": "1", "X-RateLimit-Scope": "user"}, "proxy"),  # nirn-proxy
    ],
)
def test_what_a_429_is(headers, scope):
    assert rate_limit_scope(429, headers) == scope
    assert isinstance(classify(429, headers, ""), PresentationDeferred)


def test_a_proxys_429_says_how_long_and_a_408_means_later():
    proxy = classify(429, {"generated-by-proxy": "true", "Retry-After": "1"}, "")
    assert isinstance(proxy, PresentationDeferred) and proxy.retry_after == 1.0
    assert isinstance(classify(408, VIA, "Request Timeout"), PresentationDeferred)
    assert isinstance(classify(400, VIA, "Invalid Form Body"), PresentationRefused)
    assert classify(503, VIA, "") is None  # a passing fault: tried again as it is
    assert rate_limit_scope(200, VIA) is None


def test_routes_are_logged_without_tokens():
    assert (
        route_of("PATCH", "/api/v10/webhooks/123/aW50ZXJhY3Rpb246.secret/messages/@original")
        == "PATCH /webhooks/123/{token}/messages/@original"
    )
    assert route_of("POST", "/api/v10/interactions/9/tok-en.x/callback") == "POST /interactions/9/{token}/callback"


@pytest.mark.parametrize(
    ("status", "code", "headers", "meaning", "wait"),
    [
        (None, None, {}, AckFailure.UNKNOWN, 0.0),  # no answer (a timeout, a connection lost)
        (408, 0, VIA, AckFailure.UNKNOWN, 0.0),  # a proxy gave up waiting for Discord
        (502, 0, VIA, AckFailure.UNKNOWN, 0.0),
        (400, 40060, VIA, AckFailure.DELIVERED, 0.0),  # an earlier try got through
        (429, 0, {"generated-by-proxy": "true", "Retry-After": "1"}, AckFailure.NOT_SENT, 1.0),
        (429, 0, VIA | {"Retry-After": "2"}, AckFailure.NOT_SENT, 2.0),
        (429, 0, {}, AckFailure.REFUSED, 0.0),  # a ban: every request refused
        (400, 50035, VIA, AckFailure.REFUSED, 0.0),
        (404, 10062, VIA, AckFailure.REFUSED, 0.0),  # too late: the interaction is gone
    ],
)
def test_what_a_failed_acknowledgement_means(status, code, headers, meaning, wait):
    assert acknowledgement_failure(status, code, headers) == (meaning, wait)
