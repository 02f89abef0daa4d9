"""The self-test both deployment checkers run: every broken copy of the real files must be reported,
and the intact one must not be. A checker that reports nothing would otherwise pass for one that
works."""

import copy


def run(model, check, cases, what):
    """`check(model)` returns problem strings; each case is (mutate, expected substring). Prints a
    line per miss and a summary naming `what`; returns the exit status."""
    problems = [f"the intact {what} are reported: {p}" for p in check(copy.deepcopy(model))]
    missed = 0
    for mutate, expected in cases:
        broken = copy.deepcopy(model)
        mutate(broken)
        found = check(broken)
        if not any(expected in p for p in found):
            missed += 1
            problems.append(f"{mutate.__name__}: no problem reads {expected!r} (got {found or 'none'})")
    for problem in problems:
        print(f"FAIL self-test {problem}")
    print(f"{what} self-test: {len(cases) - missed} of {len(cases)} broken copies reported")
    return 1 if problems else 0
