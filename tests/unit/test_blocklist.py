"""The blocklist matcher against two references: the regular expression the bot used before (the meaning of a rule,
on inputs short enough for it) and a plain dynamic program (on adversarial inputs it could not finish)."""

from __future__ import annotations

import functools
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.guilds.blocklist import Matcher, is_word
from bot.guilds.rules import (
    MAX_BLOCKLIST_RULE_LENGTH,
    MAX_BLOCKLIST_RULES,
    Refused,
    check_blocklist,
    check_new_rule,
    normalise_rule,
)


def old_pattern(rule: str) -> re.Pattern[str]:
    """What a rule meant until now (bot/guild_rules.py before this matcher): a backtracking regex."""
    words = rule.strip().split()
    parts = [r"\w*".join(re.escape(piece) for piece in word.split("*")) for word in words]
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.IGNORECASE)


def old_body(rule: str) -> re.Pattern[str]:
    """The same without the word boundaries, to check that a quoted span is a match in itself."""
    parts = [r"\w*".join(re.escape(piece) for piece in word.split("*")) for word in rule.split()]
    return re.compile(r"\s+".join(parts), re.IGNORECASE)


def first_rule_by_regex(rules: list[str], text: str) -> int | None:
    return next((index for index, rule in enumerate(rules) if old_pattern(rule).search(text)), None)


def first_rule_by_dynamic_program(rules: list[str], text: str) -> int | None:
    """An independent, obviously right and slower reference: can the rule's tokens match from position j?"""
    fold = [c.lower()[0].upper() for c in text]

    def matches(rule: str) -> bool:
        tokens: list[str] = []  # one character, "*" (\w*) or " " (\s+)
        for index, word in enumerate(rule.split()):
            if index:
                tokens.append(" ")
            for char in word:
                if not (char == "*" and tokens and tokens[-1] == "*"):
                    tokens.append(char)

        @functools.cache
        def rest(i: int, j: int) -> bool:  # tokens[i:] match text from j, and the match ends at a word boundary
            if i == len(tokens):
                return j == len(text) or not is_word(text[j])
            token = tokens[i]
            if token == "*":
                return rest(i + 1, j) or (j < len(text) and is_word(text[j]) and rest(i, j + 1))
            if token == " ":
                return j < len(text) and text[j].isspace() and (rest(i + 1, j + 1) or rest(i, j + 1))
            return j < len(text) and fold[j] == token.lower()[0].upper() and rest(i + 1, j + 1)

        return any(rest(0, j) for j in range(len(text) + 1) if j == 0 or not is_word(text[j - 1]))

    return next((index for index, rule in enumerate(rules) if matches(rule)), None)


# Characters where the rules are subtle: word and non-word, spaces of several kinds, and letters whose case
# folding is special (final sigma, dotless and dotted i, a combining dot, the Kelvin sign, a superscript digit).
TRICKY = "ab*  -+'._\t\n\u00a0ΣσςıIİi\u0307K²"
rule_text = st.text(alphabet=TRICKY, max_size=8)
prompt_text = st.text(alphabet=TRICKY.replace("*", "x"), max_size=16)


@settings(max_examples=3000, deadline=None)
@given(st.lists(rule_text, min_size=1, max_size=4), prompt_text)
@example(["c++"], "learning c++ today")
@example(["a * b"], "a  b")
@example(["* b"], " b")
@example(["σ"], "Σ")
@example([""], "hi !")
def test_the_matcher_means_what_the_old_regex_meant(rules, text):
    matcher = Matcher(rules)
    index = matcher.first_rule(text)
    assert index == first_rule_by_regex(rules, text)
    if index is not None:
        start, end = matcher.span(index, text)
        assert old_body(rules[index]).fullmatch(text[start:end]), "the quoted text is a match of the rule"
        assert start == 0 or not is_word(text[start - 1])
        assert end == len(text) or not is_word(text[end])


# Adversarial: many stars over a two-letter alphabet, where backtracking explodes; too long for the old regex.
star_rule = st.lists(st.sampled_from("ab"), min_size=1, max_size=30).map("*".join)
star_prompt = st.text(alphabet="aabb -", min_size=0, max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(star_rule | st.text(alphabet="ab* ", max_size=20), min_size=1, max_size=5), star_prompt)
def test_many_star_rules_against_adversarial_prompts(rules, text):
    assert Matcher(rules).first_rule(text) == first_rule_by_dynamic_program(rules, text)


def test_a_crafted_prompt_against_a_many_star_rule_is_checked_at_once():
    """Before: `re` backtracked on this for hours (201 characters already took 4 s), on the event loop."""
    rule = "n*i*g*g*e*r"
    crafted = "n" + "i" * 500 + "g" * 1000 + "e" * 499  # 2000 characters, all of the rule but its last letter
    check_blocklist([rule], crafted)
    with pytest.raises(Refused, match=r"contains “nii.*…”.*rule: `n\*i\*g\*g\*e\*r`"):
        check_blocklist([rule], crafted + "r")


def test_the_first_rule_in_the_list_is_named_and_the_words_quoted():
    with pytest.raises(Refused) as refusal:
        check_blocklist(["dark magic", "blood*", "gore"], "GORE and BLOODY dark \t magic")
    assert "“dark \t magic”" in refusal.value.message and "(rule: `dark magic`)" in refusal.value.message
    with pytest.raises(Refused, match="“BLOODY”"):
        check_blocklist(["blood*", "gore"], "GORE and BLOODY")
    check_blocklist([], "anything")


def test_new_rules_are_capped_in_length_and_number():
    full = tuple(f"word{n}" for n in range(MAX_BLOCKLIST_RULES))
    check_new_rule("x" * MAX_BLOCKLIST_RULE_LENGTH, full[:-1])
    with pytest.raises(Refused, match=f"at most {MAX_BLOCKLIST_RULE_LENGTH} characters"):
        check_new_rule("x" * (MAX_BLOCKLIST_RULE_LENGTH + 1), ())
    with pytest.raises(Refused, match=f"already holds {MAX_BLOCKLIST_RULES} rules, the most it can"):
        check_new_rule("another", full)
    check_new_rule("word7", full)  # already there: GuildAdmin says so
    assert normalise_rule("x" * 200) == "x" * 200  # an older, longer rule can still be removed
