"""SHARD_COUNT and SHARD_IDS read into this process's part of the gateway."""

from __future__ import annotations

import pytest

from bot.discord.shards import ShardPlan, parse_shard_count, parse_shard_ids, shard_of


@pytest.mark.parametrize(
    ("text", "ids"),
    [("0-3", (0, 1, 2, 3)), ("0,2", (0, 2)), (" 3, 0-1 ,1", (0, 1, 3)), ("", ()), ("ALL", None)],
)
def test_shard_ids_are_ids_and_ranges(text, ids):
    assert parse_shard_ids(text) == ids


@pytest.mark.parametrize("text", ["3-1", "a", "0-x", "-1", "5000"])
def test_a_shard_id_list_that_is_not_one_says_so(text):
    with pytest.raises(ValueError, match=r"shard id|range"):
        parse_shard_ids(text)


def test_shard_count_is_a_number_or_auto():
    assert parse_shard_count("4") == 4 and parse_shard_count(" Auto ") == "auto" and parse_shard_count("") is None
    with pytest.raises(ValueError, match="from 1 to 4096"):
        parse_shard_count("0")


def test_what_each_process_does():
    assert not ShardPlan(None).sharded and ShardPlan(None).syncs_commands and ShardPlan(None).holds_every_shard
    worker = ShardPlan(4, ())
    assert worker.worker and not worker.syncs_commands and not worker.holds_every_shard
    assert ShardPlan(4, (0, 1)).syncs_commands and not ShardPlan(4, (2, 3)).syncs_commands
    assert ShardPlan(2, (0, 1)).holds_every_shard and ShardPlan(2, None).holds_every_shard
    assert ShardPlan(4, (2, 3)).describe() == "shard 2, 3 of 4"
    with pytest.raises(ValueError, match="shard 4 does not exist with SHARD_COUNT=4"):
        ShardPlan(4, (4,))


def test_a_servers_shard_is_discords():
    assert shard_of(81384788765712384, 1) == 0
    assert shard_of((1 << 22) * 7, 4) == 3  # the creation-time bits above 22, modulo the count
