"""Blocklist matching in time linear in the prompt and in the rules: no backtracking, whatever the input.

A rule means what the regular expression `(?<!\\w)W1\\s+W2…\\s+Wn(?!\\w)` (case-insensitive) would mean, where each
word `Wi` is its characters taken literally except `*`, which stands for `\\w*` (letters, digits and underscores,
none or many). So `gore` refuses "GORE" but not "gory", `blood*` refuses "bloody", `c++` refuses "c++", and
`red wine` refuses "red  wine" but not "red winery". `\\w`, `\\s` and case-insensitivity are exactly Python's `re`
rules for text (`str.isalnum`, `str.isspace`, simple case folding), which the property tests check against `re`
itself.

`re` finds such matches by backtracking: a rule with several `*` and a crafted prompt cost it time exponential in
the number of stars. Here every rule is a chain of states and all the rules of a server are one bit vector (a
Python int, bit-parallel "shift-and"): each character of the prompt costs a few operations on that vector, so a
check costs (prompt length) x (total length of the rules) / (bits per machine word), whatever the prompt or rule.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence

_WORD, _SPACE, _OTHER = 0, 1, 2  # classes of a prompt's characters


def fold(char: str) -> str:
    """What `re.IGNORECASE` compares: two characters match when their folds are equal (simple lower case,
    then upper case, which also joins `σ`/`ς`, `i`/`ı`, `s`/`ſ` as `re` does)."""
    return char.lower()[0].upper()


def is_word(char: str) -> bool:
    """`\\w` of `re` for text."""
    return char.isalnum() or char == "_"


class Matcher:
    """Every rule of a list at once. Bits of one rule, lowest first: START (a match may begin here: at the
    text's start or after a character that is not a word character), one state per character of the rule (a
    `*` is the loop of the state before it; only a word that begins with `*` after a space needs a state of its
    own), one per space between words, then ACCEPT (the rule matched and the next character is not a word
    character; it stays set)."""

    def __init__(self, rules: Sequence[str], *, anchored: bool = False) -> None:
        self.rules = tuple(rules)
        self._anchored = anchored  # one match only, beginning where the text begins (to find a match's start)
        literal: dict[str, list[int]] = {}  # folded character -> the bits of the states it moves into
        starts: list[int] = []
        spaces: list[int] = []  # states of `\s+` between words: entered by whitespace, which they repeat
        word_loops: list[int] = []  # states that word characters keep (a `*` follows them)
        before_star: list[int] = []  # states followed by a star state (a word that begins with `*`)
        finals: list[int] = []
        accepts: list[int] = []
        self._rule_of_accept: dict[int, int] = {}
        bit = 0
        for index, rule in enumerate(self.rules):
            start = bit
            starts.append(bit)
            for number, word in enumerate(rule.split()):
                if number:
                    bit += 1
                    spaces.append(bit)
                previous = ""
                for char in word:
                    if char != "*":
                        bit += 1
                        literal.setdefault(fold(char), []).append(bit)
                    elif previous == "*":
                        pass  # `**` is `*`
                    elif previous or bit == start:
                        word_loops.append(bit)  # after a character, or at the very start: that state repeats
                    else:
                        bit += 1  # a word that begins with `*`, after a space: a state of its own
                        word_loops.append(bit)
                        before_star.append(bit - 1)
                    previous = char
            finals.append(bit)
            accepts.append(bit + 1)
            self._rule_of_accept[bit + 1] = index
            bit += 2
        self.size = bit
        self._literal = {char: _mask(bits, self.size) for char, bits in literal.items()}
        self._starts, self._spaces = _mask(starts, self.size), _mask(spaces, self.size)
        self._word_loops, self._before_star = _mask(word_loops, self.size), _mask(before_star, self.size)
        self._finals, self._accepts = _mask(finals, self.size), _mask(accepts, self.size)

    def first_rule(self, text: str) -> int | None:
        """The index of the first rule (in list order) that `text` matches, or None."""
        last = deque(self.states(text), maxlen=1)
        state = last[0] if last else self._starts
        matched = (state & self._accepts) | ((state & self._finals) << 1)
        if not matched:
            return None
        return self._rule_of_accept[(matched & -matched).bit_length() - 1]

    def states(self, text: str) -> Iterator[int]:
        """The state vector after each character of `text` (before the first one it is the START bits)."""
        literal, spaces, accepts, before_star = self._literal, self._spaces, self._accepts, self._before_star
        inject = 0 if self._anchored else self._starts
        word_loops = self._word_loops | accepts
        space_loops = spaces | accepts
        # character -> (advance mask, loop mask, class: word, space or other); built once per character seen
        classes: dict[str, tuple[int, int, int]] = {}
        state = self._starts
        for char in text:
            seen = classes.get(char)
            if seen is None:
                found = literal.get(fold(char), 0)
                if is_word(char):
                    seen = (found, word_loops, _WORD)
                elif char.isspace():
                    seen = (found | spaces | accepts, space_loops, _SPACE)
                else:
                    seen = (found | accepts, accepts, _OTHER)
                classes[char] = seen
            advance, loops, kind = seen
            if kind is _WORD:
                state = ((state << 1) & advance) | (state & loops) if advance else state & loops
            else:  # a match may begin after this character, and one that ended before it is accepted
                state = ((state << 1) & advance) | (state & loops) | inject
                if kind is _SPACE and before_star:
                    state |= (state & before_star) << 1
            yield state

    def span(self, index: int, text: str) -> tuple[int, int]:
        """Where rule `index` first matches `text` (which it must match): the earliest end, and the earliest
        start of a match that ends there."""
        forward = Matcher([self.rules[index]])
        end = len(text)
        for position, state in enumerate(forward.states(text)):
            if state & forward._accepts:
                end = position  # the character at `position` is the one after the match
                break
        backward = Matcher([_reversed_rule(self.rules[index])], anchored=True)
        start = end
        live = ~backward._accepts
        for offset, state in enumerate(backward.states(text[end - 1 :: -1] if end else "")):
            position = end - 1 - offset
            if state & backward._finals and (position == 0 or not is_word(text[position - 1])):
                start = position
            if not state & live:
                break
        return start, end


def _mask(bits: list[int], size: int) -> int:
    """An int with these bits set, built in one pass (OR-ing bits one by one into a large int is quadratic)."""
    buffer = bytearray(size // 8 + 1)
    for bit in bits:
        buffer[bit >> 3] |= 1 << (bit & 7)
    return int.from_bytes(buffer, "little")


def _reversed_rule(rule: str) -> str:
    """The same rule read backwards (`\\w*` and `\\s+` read the same both ways)."""
    return " ".join(word[::-1] for word in reversed(rule.split()))


@functools.lru_cache(maxsize=64)
def matcher_for(rules: tuple[str, ...]) -> Matcher:
    """One matcher per server's list, built once (a list changes only through /config blocklist)."""
    return Matcher(rules)
