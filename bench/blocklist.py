"""Blocklist benchmark: the worst 2,000-character prompt against the largest rule list a server may hold.

    python -m bench.blocklist            # the table and the worst case against its target (about 20 s)
    python -m bench.blocklist --before   # also the regex the bot used before, on short crafted prompts

`check_blocklist` runs on the event loop for every /imagine, /remix and Edit, before the acknowledgement, so its
worst case is a stall every server's members feel. Its cost is (the prompt's length once normalised) x (the
rules' total length), so the worst case is the largest allowed list (`MAX_BLOCKLIST_RULES` rules of
`MAX_BLOCKLIST_RULE_LENGTH` characters) against the prompt that is longest once normalised and whose every
character moves the rules' states: 2,000 x U+FDFA, which NFKC spells out in 18 characters (36,000 in all), against
rules made of those very letters, with `*` between them so that every rule stays alive over every word. The other
rows show that no other combination tried comes close.

Since a prompt is read only up to `MAX_NORMALISED_PROMPT` characters once normalised (a longer one is refused for its
length, unread), the worst case read in full is 222 x U+FDFA (3,996 characters); 2,000 of them (86.7 ms before the
cap) are now refused in about 2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/blocklist.py` puts bench/ first on the path, not the project
    sys.path.insert(0, str(ROOT))

from bot.guilds.blocklist import matcher_for  # noqa: E402
from bot.guilds.rules import (  # noqa: E402
    MAX_BLOCKLIST_RULE_LENGTH,
    MAX_BLOCKLIST_RULES,
    MAX_NORMALISED_PROMPT,
    Refused,
    check_blocklist,
    normalise_prompt,
)

PROMPT_LENGTH = 2000  # Discord's limit for the prompt option
TARGET_MS = 100.0  # the worst check holds the event loop: the same target as bench/run.py's largest stall
LIGATURE = "\ufdfa"  # the character NFKC expands the most (to 18 characters)
ARABIC = sorted(set(unicodedata.normalize("NFKC", LIGATURE)) - {" "})
LATIN = "abcdefghijklmnopqrstuvwxyz"
LONGEST_READ = MAX_NORMALISED_PROMPT // len(unicodedata.normalize("NFKC", LIGATURE))  # 222 ligatures: 3,996


def rule_list(alphabet: Sequence[str], *, stars: bool, seed: int = 1) -> tuple[str, ...]:
    """`MAX_BLOCKLIST_RULES` distinct rules of exactly `MAX_BLOCKLIST_RULE_LENGTH` characters (words of 2 to 8
    letters; with `stars`, each word is `*l*l*l…`)."""
    chooser = random.Random(seed)
    rules: set[str] = set()
    while len(rules) < MAX_BLOCKLIST_RULES:
        text = ""
        while len(text) < MAX_BLOCKLIST_RULE_LENGTH:
            letters = [chooser.choice(alphabet) for _ in range(chooser.randint(2, 8))]
            word = "*" + "*".join(letters) if stars else "".join(letters)
            text = f"{text} {word}" if text else word
        rules.add(text[:MAX_BLOCKLIST_RULE_LENGTH].rstrip())
    return tuple(sorted(rules))


def prompts() -> dict[str, str]:
    chooser = random.Random(2)
    return {
        # The longest prompt read in full: its normalised form just within MAX_NORMALISED_PROMPT.
        f"{LONGEST_READ} x U+FDFA ({LONGEST_READ * 18:,} once normalised)": LIGATURE * LONGEST_READ,
        # Longer ones are refused for their length, unread (what this row measures).
        "2000 x U+FDFA (36,000 once normalised: refused)": LIGATURE * PROMPT_LENGTH,
        "2000 x U+33AF ㎯ (rad∕s2, 12,000: refused)": "\u33af" * PROMPT_LENGTH,
        "Latin letters and spaces": "".join(chooser.choice(LATIN + " ") for _ in range(PROMPT_LENGTH)),
        "'a ' x 1000": "a " * (PROMPT_LENGTH // 2),
        "'a' x 2000": "a" * PROMPT_LENGTH,
        "punctuation": "-" * PROMPT_LENGTH,
    }


def timed(call: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with contextlib.suppress(Refused):
            call()
        times.append(time.perf_counter() - started)
    return times


def old_pattern(rule: str) -> re.Pattern[str]:
    """The regex the bot compiled for a rule before bot/blocklist.py (the backtracking one)."""
    words = rule.strip().split()
    parts = [r"\w*".join(re.escape(piece) for piece in word.split("*")) for word in words]
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.IGNORECASE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="checks per cell; the median is shown")
    parser.add_argument("--before", action="store_true", help="also time the old regex on short crafted prompts")
    options = parser.parse_args(argv)

    lists = {
        "Arabic, stars": rule_list(ARABIC, stars=True),
        "Arabic, plain": rule_list(ARABIC, stars=False),
        "Latin, stars": rule_list(LATIN, stars=True),
        "Latin, plain": rule_list(LATIN, stars=False),
        "r a d s 2, stars": rule_list("rads2", stars=True),
    }
    print(
        f"{MAX_BLOCKLIST_RULES} rules of {MAX_BLOCKLIST_RULE_LENGTH} characters; "
        f"check_blocklist, median of {options.runs} (max) in ms"
    )
    build = []
    for rules in lists.values():
        matcher_for.cache_clear()
        build.append(timed(lambda rules=rules: matcher_for(rules), 1)[0])
    print(f"building a list's matcher (once per change of the list): {max(build) * 1000:.1f} ms at most")
    worst = (0.0, "", "")
    for prompt_name, prompt in prompts().items():
        cells = []
        for list_name, rules in lists.items():
            matcher_for(rules)
            times = timed(lambda rules=rules, prompt=prompt: check_blocklist(rules, prompt), options.runs)
            median = statistics.median(times)
            cells.append(f"{list_name}: {median * 1000:.1f} ({max(times) * 1000:.1f})")
            worst = max(worst, (median, prompt_name, list_name))
        print(f"  {prompt_name} [{len(normalise_prompt(prompt))} characters]: " + "; ".join(cells))
    passed = worst[0] * 1000 < TARGET_MS
    print(
        f"worst: {worst[0] * 1000:.1f} ms ({worst[1]}, {worst[2]}); target < {TARGET_MS:.0f} ms: "
        f"{'PASS' if passed else 'FAIL'}"
    )
    if options.before:
        pattern = old_pattern("n*i*g*g*e*r")
        for length in (101, 151, 201):
            third = (length - 1) // 4
            crafted = "n" + "i" * third + "g" * (2 * third) + "e" * (length - 1 - 3 * third)
            old = timed(lambda crafted=crafted: pattern.search(crafted), 1)[0]
            new = timed(lambda crafted=crafted: check_blocklist(["n*i*g*g*e*r"], crafted), 1)[0]
            print(
                f"before: rule n*i*g*g*e*r, a crafted {length}-character prompt: {old:.2f} s (now {new * 1000:.2f} ms)"
            )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
